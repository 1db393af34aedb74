"""OutpostSpawner's own logic against a real in-process Outpost (no hub, no tunnel):
hooks, state, polling, naming. The end-to-end tests cover it inside a real JupyterHub."""

from __future__ import annotations

import asyncio

import pytest
from tornado import web

from outpost_client.spawner import OutpostStartFailed, remote_server_name

from .harness.hub import make_spawner

pytestmark = pytest.mark.rpc


@pytest.mark.parametrize(
    "template, user, server, expected",
    [
        ("{username}--{servername}", "alice", "", "alice"),
        ("{username}--{servername}", "alice", "gpu", "alice--gpu"),
        ("{username}--{servername}", "a b/c", "", "a_20b_2fc"),
        ("{username}", "_hidden", "", "x_hidden"),
    ],
)
def test_remote_server_name(template, user, server, expected):
    assert remote_server_name(template, user, server) == expected


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
        "outpost_server.testing.SlowSpawner", allow_override=["delay"], **{"SlowSpawner.delay": 0.0}
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
    from outpost_client.spawner import poller_for

    async with start_outpost("outpost_server.testing.InstantSpawner") as op:
        spawners = []
        for i in range(40):
            sp = make_spawner(op, name=f"s{i}")
            await sp.start()
            spawners.append(sp)
        await spawners[5].stop()  # one of them is gone
        poller = poller_for(spawners[0].outpost, spawners[0].outpost_timeout, spawners[0].poll_batch_window)
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
