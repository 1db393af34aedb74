"""OutpostSpawner's own logic against a real in-process Outpost (no hub, no tunnel):
hooks, state, polling, naming. The end-to-end tests cover it inside a real JupyterHub."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Unicode

from outpost_client import pb
from outpost_client.spawner import SERVER_NAME_RE, OutpostSpawner, OutpostStartFailed, remote_server_name
from outpost_server.hosting import StandInHub, StandInUser

from .harness.hub import make_spawner

pytestmark = pytest.mark.rpc


TEMPLATE = "{username}--{servername}"


@pytest.mark.parametrize(
    "template, user, server, expected",
    [
        # the names of usual users and servers are as they always were
        (TEMPLATE, "alice", "", "alice"),
        (TEMPLATE, "alice", "gpu", "alice--gpu"),
        (TEMPLATE, "john_doe", "my-server", "john_doe--my-server"),
        (TEMPLATE, "alice@example.org", "a.b+c", "alice@example.org--a.b+c"),
        (TEMPLATE, "a b/c", "", "a_20b_2fc"),
        ("{username}", "_hidden", "", "x_hidden"),
        # what could be read two ways is escaped
        (TEMPLATE, "a--b", "", "a_2d_2db"),
        (TEMPLATE, "a-", "b", "a_2d--b"),
        (TEMPLATE, "a", "-b", "a--_2db"),
        (TEMPLATE, "a_20b", "", "a_5f20b"),
        (TEMPLATE, "a_", "b", "a_5f--b"),
        (TEMPLATE, "x_x", "", "xx_x"),
        (TEMPLATE, "Ünï", "", "x_c3_9cn_c3_af"),
    ],
)
def test_remote_server_name(template, user, server, expected):
    assert remote_server_name(template, user, server) == expected


@pytest.mark.parametrize(
    "first, second",
    [
        (("a", "b"), ("a--b", "")),  # the example
        (("a", "b--c"), ("a--b", "c")),
        (("a-", "b"), ("a", "-b")),
        (("a", ""), ("a--", "")),
        (("a b", ""), ("a_20b", "")),  # an escape and the same text typed in
        (("a_", "b"), ("a", "_b")),
        (("_x", ""), ("x_x", "")),  # the "x" put in front and a name starting with x
        (("x", "-y"), ("x-", "y")),
        (("a", "b_2d_2dc"), ("a--b", "--c")),
    ],
)
def test_remote_server_names_of_different_servers_never_collide(first, second):
    assert remote_server_name(TEMPLATE, *first) != remote_server_name(TEMPLATE, *second)


def read_back(name: str) -> tuple[str, str]:
    """(user name, server name) from a remote server name of TEMPLATE: the inverse that
    shows remote_server_name is injective."""
    if re.match(r"x+[^A-Za-z0-9]", name):
        name = name[1:]

    def unescape(field: str) -> str:
        out, i = bytearray(), 0
        while i < len(field):
            if field[i] == "_" and re.fullmatch(r"[0-9a-f]{2}", field[i + 1 : i + 3]):
                out.append(int(field[i + 1 : i + 3], 16))
                i += 3
            else:
                out += field[i].encode()
                i += 1
        return out.decode()

    user, _, server = name.partition("--")
    return unescape(user), unescape(server)


NAME_CHARS = st.sampled_from("ax_-.5f2d@+/ Ü")


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(user=st.text(NAME_CHARS, min_size=1, max_size=12), server=st.text(NAME_CHARS, max_size=12))
def test_remote_server_names_read_back_to_user_and_server(user, server):
    name = remote_server_name(TEMPLATE, user, server)
    assert SERVER_NAME_RE.fullmatch(name), name  # what the Outpost accepts
    assert read_back(name) == (user, server)


def test_a_name_too_long_for_the_outpost_is_refused_not_cut():
    """Cut to 255 characters, two long names would be one server."""
    assert len(remote_server_name(TEMPLATE, "u" * 200, "s" * 53)) == 255
    with pytest.raises(ValueError, match="would be 256 characters long.*choose a shorter server name"):
        remote_server_name(TEMPLATE, "u" * 200, "s" * 54)
    with pytest.raises(ValueError, match="server_name_template '{username}/{servername}'"):
        remote_server_name("{username}/{servername}", "alice", "gpu")


async def test_a_server_started_under_the_old_names_is_still_found(start_outpost):
    """A hub upgraded while notebooks run: the name a server got at its start is in the
    hub's state (remote_name), and poll and stop use that, never a name made anew. The
    old naming kept "_20" as typed: alice's server "my_2024" was "alice--my_2024" (now
    "alice--my_5f2024"), and user "alice--b"'s default server was "alice--b", which is now
    the name of alice's server "b": that start is refused while the old one runs, never
    attached to it."""
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        await op.client.start("alice--my_2024", "old-1", user_name="alice", wait_until_ready=True)
        await op.client.start("alice--b", "old-2", user_name="alice--b", wait_until_ready=True)
        spawner = make_spawner(op, name="my_2024")
        spawner.load_state({"outpost_name": "default", "remote_name": "alice--my_2024", "start_id": "old-1"})
        assert await spawner.poll() is None  # found, running
        assert remote_server_name(TEMPLATE, "alice", "my_2024") == "alice--my_5f2024"
        await spawner.stop()
        assert await spawner.poll() == 0
        assert [s.server_name for s in await op.client.list_servers()] == ["alice--b"]

        with pytest.raises(OutpostStartFailed, match="is running under start_id 'old-2'"):
            await make_spawner(op, name="b").start()
        (status,) = await op.client.list_servers()
        assert (status.server_name, status.start_id, status.state) == ("alice--b", "old-2", pb.SERVER_STATE_RUNNING)


async def test_start_poll_stop_and_state(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.2}) as op:
        spawner = make_spawner(op)
        url = await spawner.start()
        assert url == "http://127.0.0.1:23456"  # no tunnel: the address the Outpost reports
        progress = [e["message"] async for e in spawner.progress()]
        assert "Step 1 of 4" in progress
        assert await spawner.poll() is None
        state = spawner.get_state()
        assert state["remote_name"] == "alice" and state["start_id"] and state["remote_port"] == 23456

        # a "restarted hub": a new Spawner object loads the state and finds the same start
        again = make_spawner(op)
        again.load_state(state)
        assert await again.poll() is None
        await again.stop()
        assert await again.poll() == 0
        assert await spawner.poll() == 0  # gone for everyone
        again.clear_state()
        assert again.get_state() == {}


async def test_hooks_and_overrides(start_outpost):
    async with start_outpost(
        "outpost_server.testing.SlowSpawner",
        allow_override=["delay"],
        allow_env=["ADDED_BY_HOOK"],
        allow_user_options=["profile", "added"],
        **{"SlowSpawner.delay": 0.0},
    ) as op:
        seen = {}

        async def custom_env(spawner, env):
            env["ADDED_BY_HOOK"] = "yes"
            return env

        def custom_options(spawner, options):
            return dict(options, added=True)

        async def allowed(spawner, options):
            seen["options"] = options
            return options.get("profile") != "forbidden"

        spawner = make_spawner(
            op,
            custom_env=custom_env,
            custom_user_options=custom_options,
            config_overrides=lambda s: {"delay": 0.05},
            check_allowed=allowed,
        )
        spawner.user_options = {"profile": "small"}
        await spawner.start()
        rec = op.manager.records[("default", "alice")]
        assert rec.spec.env["ADDED_BY_HOOK"] == "yes"
        assert rec.spec.env["JUPYTERHUB_API_TOKEN"] == "secret-token"
        assert "PATH" not in rec.spec.env  # env_keep is empty on the hub side
        assert rec.spec.user_options == {"profile": "small", "added": True}
        assert rec.spawner.delay == 0.05
        assert rec.spec.user["id"] == 7
        await spawner.stop()

        denied = make_spawner(op, check_allowed=allowed)
        denied.user_options = {"profile": "forbidden"}
        with pytest.raises(web.HTTPError) as err:
            await denied.start()
        assert err.value.status_code == 403
        assert "alice" not in {n for (_, n) in op.manager.records}


async def test_override_refused_by_outpost_reaches_user(start_outpost):
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawner = make_spawner(op, config_overrides={"cmd": ["evil"]})
        with pytest.raises(OutpostStartFailed) as err:
            await spawner.start()
        assert "does not allow your hub to override cmd" in err.value.jupyterhub_message


async def test_remote_failure_is_raised_with_its_message(start_outpost):
    async with start_outpost("outpost_server.testing.FailingSpawner") as op:
        spawner = make_spawner(op)
        with pytest.raises(OutpostStartFailed) as err:
            await spawner.start()
        assert err.value.jupyterhub_message == "No GPU left for you today"


async def test_wildcard_tunnel_listen_host_needs_a_connect_host(start_outpost):
    """0.0.0.0 is no address for the proxy to connect to: the start fails with what to set,
    before anything is started at the site."""
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawner = make_spawner(op, ssh_host="127.0.0.1", tunnel_listen_host="0.0.0.0")
        with pytest.raises(ValueError) as err:
            await spawner.start()
        assert "set OutpostSpawner.tunnel_connect_host" in str(err.value)
        assert await spawner.client.list_servers() == []


async def test_choose_outpost(start_outpost):
    async with start_outpost("outpost_server.testing.InstantSpawner") as a, start_outpost(
        "outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.0}
    ) as b:
        outposts = {"gpu": {"address": b.address}}
        named = make_spawner(a, name="gpu", outposts=outposts)
        assert await named.start() == "http://127.0.0.1:23456"  # SlowSpawner's address: Outpost b
        by_option = make_spawner(a, outposts=outposts)
        by_option.user_options = {"outpost": "gpu"}
        assert await by_option._choose_outpost() == "gpu"
        default = make_spawner(a, outposts=outposts)
        assert await default.start() == "http://127.0.0.1:12345"  # InstantSpawner: Outpost a
        unknown = make_spawner(a, outposts=outposts)
        unknown.user_options = {"outpost": "nowhere"}
        with pytest.raises(web.HTTPError) as err:
            await unknown.start()
        assert err.value.status_code == 400
        assert await named.poll() is None and await default.poll() is None
        await named.stop()
        await default.stop()


async def test_poll_when_outpost_unreachable_assumes_running(start_outpost):
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawner = make_spawner(op)
        await spawner.start()
        state = spawner.get_state()
    # the Outpost is gone (stopped): the hub must not declare the notebook dead
    orphan = make_spawner(op, outpost_timeout=1.0)
    orphan.load_state(state)
    assert await orphan.poll() is None


async def test_polls_of_many_spawners_share_one_batch_call(start_outpost):
    """One shared poller per Outpost: concurrent polls become one BatchPoll."""
    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawners = []
        for i in range(40):
            sp = make_spawner(op, name=f"s{i}")
            await sp.start()
            spawners.append(sp)
        await spawners[5].stop()  # one of them is gone
        poller = spawners[0]._resources.poller(spawners[0].outpost_timeout, spawners[0].poll_batch_window)
        before = poller.calls
        results = await asyncio.gather(*(sp.poll() for sp in spawners))
        assert poller.calls - before == 1
        assert results[5] == 0
        assert [r for i, r in enumerate(results) if i != 5] == [None] * 39
        # with the window off, each poll is its own call (and answers the same)
        solo = make_spawner(op, name="s1", poll_batch_window=0)
        solo.load_state(spawners[1].get_state())
        assert await solo.poll() is None
        for sp in spawners:
            await sp.stop()


# --- the option table (outpost_client.outposts) ------------------------------------------


def bare_spawner(**traits) -> OutpostSpawner:
    """An OutpostSpawner without an Outpost behind it (nothing here makes a call)."""
    user = StandInUser(name="alice", id=7, admin=False, url="/user/alice/")
    hub = StandInHub(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    return OutpostSpawner(user=user, hub=hub, orm_spawner=None, **traits)


def test_every_option_is_a_trait_and_setting_it_changes_the_default_outpost():
    """Each OutpostConfig field is an OutpostSpawner trait of the same type; setting the
    trait drops the cached configs, so the "default" Outpost has the new value."""
    from dataclasses import fields

    from traitlets import Bool, Integer, Unicode

    from outpost_client.outposts import OPTIONS, TRAIT_NAMES, OutpostConfig

    assert [o.key for o in OPTIONS] == [f.name for f in fields(OutpostConfig)]
    assert len(set(TRAIT_NAMES)) == len(OPTIONS)
    traits = OutpostSpawner.class_traits(config=True)
    spawner = bare_spawner()
    for opt in OPTIONS:
        trait = traits.get(opt.trait_name)
        assert trait is not None, f"{opt.key}: no OutpostSpawner.{opt.trait_name}"
        assert spawner.outpost.address == "127.0.0.1:50051"  # built and cached
        if isinstance(trait, Bool):
            value = not trait.default_value
        elif isinstance(trait, Integer):
            value = trait.default_value + 1
        else:
            assert isinstance(trait, Unicode), opt
            value = f"changed-{opt.key}"
        setattr(spawner, opt.trait_name, value)
        assert getattr(spawner.outpost, opt.key) == value, f"{opt.trait_name} did not reach the config"
        spawner.outpost_address = "127.0.0.1:50051"
    # every key the default Outpost has is one an `outposts` entry may have
    entry = {o.key: getattr(spawner.outpost, o.key) for o in OPTIONS}
    assert OutpostConfig.from_dict("site", entry) == spawner.outpost


def test_an_outposts_entry_defaults_as_the_default_outpost():
    """An `outposts` entry with only an address is what the traits' defaults make."""
    from outpost_client.outposts import OutpostConfig, default_config

    assert OutpostConfig.from_dict("site", {"address": "127.0.0.1:50051"}) == default_config(bare_spawner())
    spawner = bare_spawner(outposts={"site": {"address": "127.0.0.1:1", "ssh_port": 22}})
    assert spawner._outpost_configs()["site"] == OutpostConfig("127.0.0.1:1", ssh_port=22)
    spawner.outposts = {"site": {"address": "127.0.0.1:2"}}  # a change drops the cache too
    assert spawner._outpost_configs()["site"].address == "127.0.0.1:2"


def test_the_outposts_help_and_docs_name_every_key():
    import re

    from outpost_client.outposts import OPTIONS

    from .harness.outpost import ROOT

    help_text = OutpostSpawner.class_traits()["outposts"].help
    row = next(line for line in (ROOT / "docs" / "hub.md").read_text().splitlines() if line.startswith("| `outposts`"))
    for opt in OPTIONS:
        assert re.search(rf"\b{opt.key}\b", help_text), f"the outposts help does not name {opt.key!r}"
        assert f"`{opt.key}`" in row, f"docs/hub.md's outposts row does not name {opt.key!r}"


@pytest.mark.parametrize(
    "trait, value",
    [("outpost_timeout", 0), ("poll_batch_window", -0.1), ("ssh_port", 0), ("hub_api_site_port", 70000)],
)
def test_outpost_spawner_refuses_numbers_out_of_bounds(trait, value):
    from traitlets import TraitError

    with pytest.raises(TraitError, match=trait):
        OutpostSpawner(**{trait: value})


class HtmlProgressSpawner(Spawner):
    """Its progress carries html_message, as a site's Spawner may (or whatever a notebook
    user at the site got into it)."""

    html = Unicode(config=True)

    async def start(self):
        await asyncio.sleep(0.3)  # progress() is followed while start() runs
        return ("127.0.0.1", 12345)

    async def progress(self):
        yield {"progress": 10, "message": "queued", "html_message": self.html}
        await asyncio.sleep(1)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


async def test_html_messages_are_sanitized_before_the_spawn_page(start_outpost):
    hostile = (
        '<b>Job 7</b> queued <a href="https://docs.example.org/q">why?</a>'
        '<script>fetch("/hub/api/users")</script><img src=x onerror="alert(1)">'
        '<a href="javascript:alert(2)">x</a>'
    )
    async with start_outpost(HtmlProgressSpawner, **{"HtmlProgressSpawner.html": hostile}) as op:
        spawner = make_spawner(op)
        await spawner.start()
        shown = [e["html_message"] async for e in spawner.progress() if "html_message" in e]
        await spawner.stop()
    assert len(shown) == 1
    html = shown[0]
    assert "<b>Job 7</b> queued" in html and 'href="https://docs.example.org/q"' in html
    for bad in ("<script", "onerror", "javascript:", "fetch("):
        assert bad not in html, html
