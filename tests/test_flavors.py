"""Flavors (issue 12): c.Outpost.flavors / flavors_file / max_servers_per_user, admission
in one step with taking the server's place, ListFlavors, SIGHUP reload
(outpost_server/flavors.py, manager.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3

import grpc
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from outpost_client import (
    FlavorLimitReached,
    FlavorNotAllowed,
    InvalidArgument,
    OutpostClient,
    UnknownFlavor,
    pb,
)
from outpost_client.errors import FLAVOR_LIMIT_REACHED, FLAVOR_NOT_ALLOWED, INVALID_FIELD, UNKNOWN_FLAVOR
from outpost_server import migrations
from outpost_server.flavors import Flavor, FlavorConfigError, FlavorSet, Usage, limit_refusal, parse_flavor
from outpost_server.store import SCHEMA_VERSION, async_url
from outpost_server.testing import SlowSpawner

from .harness.hub import hub_client
from .harness.outpost import grpcurl, one_line, run_outpost, stored_rows
from .harness.util import sid, wait_for

pytestmark = pytest.mark.rpc

NEVER_READY = "outpost_server.testing.NeverReadySpawner"
SLOW = "outpost_server.testing.SlowSpawner"


def outcome(results) -> tuple[list, list]:
    """(accepted StartResponses, FlavorLimitReached refusals); anything else fails."""
    accepted = [r for r in results if isinstance(r, pb.StartResponse)]
    refused = [r for r in results if isinstance(r, FlavorLimitReached)]
    assert len(accepted) + len(refused) == len(results), [r for r in results if r not in accepted + refused]
    return accepted, refused


def active_rows(rows, flavor: str) -> list[dict]:
    return [r for r in rows if r["flavor"] == flavor and r["state"] in ("starting", "running", "stopping", "unknown")]


# --- the configuration, checked (pure) ---------------------------------------------------


@pytest.mark.parametrize(
    "config, error",
    [
        ({"bad name!": {}}, "'bad name!' is not a flavor name"),
        ({"gpu": {"maxPerUser": 2}}, "flavors['gpu']: unknown field 'maxPerUser'"),
        ({"gpu": {"max_total": -1}}, "flavors['gpu'].max_total: a number from 0"),
        ({"gpu": {"max_total": 1.5}}, "flavors['gpu'].max_total: a whole number"),
        ({"gpu": {"hubs": "main"}, "cpu": {"users": [""]}}, "flavors['cpu'].users: a list of non-empty strings"),
        ({"gpu": {"users_regex": "("}}, "flavors['gpu'].users_regex: not a regular expression"),
        ({"gpu": {"admin_only": "yes"}}, "flavors['gpu'].admin_only: true or false"),
        ({"a": {"default": True}, "b": {"default": True}}, "only one flavor may be the default, not a, b"),
        ({"gpu": {"config": {"no_such_option": 1}}}, "flavors['gpu'].config: SlowSpawner has no configurable option"),
        ({"gpu": {"config": {"delay": "soon"}}}, "flavors['gpu'].config.delay:"),
        ({"gpu": "small"}, "flavors['gpu']: a dict of its fields"),
    ],
)
def test_a_malformed_flavor_is_one_line_naming_flavor_and_field(config, error):
    with pytest.raises(FlavorConfigError) as e:
        FlavorSet.parse(config, spawner_class=SlowSpawner)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_who_may_use_a_flavor():
    flavors = FlavorSet.parse(
        {
            "open": {"default": True, "weight": 5},
            "main-only": {"hubs": ["main", "lab-*"]},
            "by-name": {"users": ["alice", "prof-*"]},
            "by-regex": {"users_regex": r"[a-z]+\d{2}"},
            "by-group": {"groups": ["gpu-users"]},
            "admins": {"admin_only": True, "weight": -1},
        }
    )
    user = {"name": "bob", "groups": [], "admin": False}
    # ordered by weight, then name; the hub rule decides what is listed at all
    assert [f.name for f in flavors.offered("main")] == ["admins", "by-group", "by-name", "by-regex", "main-only", "open"]
    assert [f.name for f in flavors.offered("lab-7")] == [f.name for f in flavors.offered("main")]
    assert "main-only" not in [f.name for f in flavors.offered("guests")]
    assert flavors.resolve("guests", user, "").name == "open"  # the default
    with pytest.raises(UnknownFlavor, match="no flavor 'main-only' for your hub"):
        flavors.resolve("guests", user, "main-only")  # as if it did not exist
    assert flavors.resolve("main", user, "main-only").name == "main-only"
    with pytest.raises(FlavorNotAllowed, match="not for your account"):
        flavors.resolve("main", user, "by-name")
    assert flavors.resolve("main", dict(user, name="prof-x"), "by-name").name == "by-name"
    assert flavors.resolve("main", dict(user, name="abc12"), "by-regex").name == "by-regex"
    with pytest.raises(FlavorNotAllowed):
        flavors.resolve("main", dict(user, name="abc123"), "by-regex")  # a full match
    with pytest.raises(FlavorNotAllowed, match="not for your groups"):
        flavors.resolve("main", user, "by-group")
    assert flavors.resolve("main", dict(user, groups=["x", "gpu-users"]), "by-group").name == "by-group"
    with pytest.raises(FlavorNotAllowed, match="only for administrators"):
        flavors.resolve("main", user, "admins")
    assert flavors.resolve("main", dict(user, admin=True), "admins").name == "admins"
    with pytest.raises(UnknownFlavor):
        flavors.resolve("main", user, "nope")
    # no flavors: only "no flavor"
    assert FlavorSet().resolve("main", user, "") is None
    with pytest.raises(UnknownFlavor, match="has no flavors"):
        FlavorSet().resolve("main", user, "small")
    # flavors but no default for this hub: Start must name one
    with pytest.raises(InvalidArgument, match="flavor: is required"):
        FlavorSet.parse({"x": {}}).resolve("main", user, "")


def test_limits_the_user_can_act_on_come_first():
    flavor = parse_flavor("gpu", {"max_total": 4, "max_per_hub": 3, "max_per_user": 1})
    assert limit_refusal(flavor, Usage(total=3, hub=2, user=0, user_total=4), 5) is None
    cases = [
        (Usage(4, 3, 1, 5), 5, "user_total", "5", "5"),
        (Usage(4, 3, 1, 1), 5, "user", "1", "1"),
        (Usage(4, 3, 0, 1), 0, "hub", "3", "3"),
        (Usage(4, 2, 0, 1), 0, "total", "4", "4"),
    ]
    for usage, cap, limit, maximum, in_use in cases:
        refusal = limit_refusal(flavor, usage, cap)
        assert refusal.metadata == {"flavor": "gpu", "limit": limit, "max": maximum, "in_use": in_use}
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refusal.reason == FLAVOR_LIMIT_REACHED
    assert "All 4 servers of flavor 'gpu' are in use" in limit_refusal(flavor, Usage(4, 0, 0, 0), 0).message
    assert limit_refusal(None, Usage(user_total=2), 2).metadata["limit"] == "user_total"
    assert parse_flavor("x", {"max_runtime": 3600}).max_runtime == 3600.0 and Flavor("y").max_runtime == 0.0


def test_a_malformed_flavors_file_stops_the_outpost_with_one_line(tmp_path):
    (tmp_path / "flavors.yaml").write_text("small:\n  max_total: [1\n")
    (tmp_path / "outpost_config.py").write_text(
        f'c.Outpost.flavors_file = {str(tmp_path / "flavors.yaml")!r}\n'
        'c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"\n'
    )
    out = run_outpost("--port", "0", "--allow-unauthenticated", cwd=tmp_path)
    line = one_line(out)
    assert "flavors_file" in line and "not valid YAML" in line
    (tmp_path / "flavors.yaml").write_text("small:\n  max_total: lots\n")
    line = one_line(run_outpost("--port", "0", "--allow-unauthenticated", cwd=tmp_path))
    assert "flavors['small'].max_total" in line


# --- admission ----------------------------------------------------------------------------


async def test_200_concurrent_starts_admit_exactly_the_limit(start_outpost, db_url):
    traits = {"flavors": {"small": {"max_total": 7}}, "max_concurrent_starts_per_hub": 0, "db_url": db_url}
    async with start_outpost(NEVER_READY, **traits) as op:
        results = await asyncio.gather(
            *(op.client.start(f"s{i}", sid(), user_name=f"u{i}", flavor="small") for i in range(200)),
            return_exceptions=True,
        )
        accepted, refused = outcome(results)
        assert len(accepted) == 7 and len(refused) == 193
        assert all(r.status.flavor == "small" for r in accepted)
        assert refused[0].metadata == {"flavor": "small", "limit": "total", "max": "7", "in_use": "7"}
        assert "All 7 servers of flavor 'small' are in use" in refused[0].message
        rows = await stored_rows(op.app)
        assert len(rows) == 7 and len(active_rows(rows, "small")) == 7
        listed = await op.client.list_flavors("someone")
        assert [(f.name, f.in_use_total, f.available) for f in listed.flavors] == [("small", 7, False)]
        assert listed.flavors[0].unavailable_reason == refused[0].message


async def test_default_flavor_unknown_flavor_and_no_flavors(start_outpost):
    flavors = {"small": {"default": True}, "big": {}}
    async with start_outpost(flavors=flavors) as op:
        r = await op.client.start("a", sid(), user_name="ann")
        assert r.status.flavor == "small"
        assert (await op.client.poll("a")).flavor == "small"
        with pytest.raises(UnknownFlavor) as e:
            await op.client.start("b", sid(), user_name="ann", flavor="huge")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == UNKNOWN_FLAVOR
        assert e.value.metadata == {"flavor": "huge"}
        with pytest.raises(InvalidArgument) as e:
            await op.client.start("b", sid(), user_name="ann", flavor="no such/flavor")
        assert e.value.reason == INVALID_FIELD and e.value.metadata == {"field": "flavor"}
        assert ("default", "b") not in op.manager.records
    # an Outpost without flavors starts as before, and refuses any flavor
    async with start_outpost() as op:
        r = await op.client.start("a", sid(), user_name="ann", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_RUNNING and r.status.flavor == ""
        with pytest.raises(UnknownFlavor):
            await op.client.start("b", sid(), user_name="ann", flavor="small")
        listed = await op.client.list_flavors("ann")
        assert (list(listed.flavors), listed.default_flavor, listed.user_in_use_total) == ([], "", 1)


async def test_per_user_limit_and_the_sites_cap_across_flavors(start_outpost):
    flavors = {"small": {"max_per_user": 2, "default": True}, "big": {}}
    async with start_outpost(NEVER_READY, flavors=flavors, max_servers_per_user=3) as op:
        c = op.client
        first = sid()
        await c.start("a1", first, user_name="ann")
        await c.start("a2", sid(), user_name="ann", flavor="small")
        with pytest.raises(FlavorLimitReached) as e:
            await c.start("a3", sid(), user_name="ann")
        assert e.value.metadata == {"flavor": "small", "limit": "user", "max": "2", "in_use": "2"}
        assert "You already have 2 servers of flavor 'small'" in e.value.message
        # a retry of an accepted start is never counted again nor refused
        again = await c.start("a1", first, user_name="ann")
        assert not again.created and again.status.start_id == first
        await c.start("b1", sid(), user_name="bob")  # another user has their own share
        await c.start("a3", sid(), user_name="ann", flavor="big")
        with pytest.raises(FlavorLimitReached) as e:
            await c.start("a4", sid(), user_name="ann", flavor="big")
        assert e.value.metadata == {"flavor": "big", "limit": "user_total", "max": "3", "in_use": "3"}
        listed = await c.list_flavors("ann")
        assert (listed.user_max_total, listed.user_in_use_total, listed.default_flavor) == (3, 3, "small")
        assert {f.name: (f.in_use_user, f.available) for f in listed.flavors} == {
            "big": (1, False),
            "small": (2, False),
        }
        # Stop frees a place
        await c.stop("a1", first)
        assert (await c.start("a4", sid(), user_name="ann", flavor="big")).created


async def test_per_hub_limit_and_hub_rules(start_outpost, pki):
    traits = {
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "tls_client_ca": pki.ca.cert,
        "flavors": {
            "shared": {"max_total": 3, "max_per_hub": 2},
            "gpu": {"hubs": ["hub-b*"], "groups": ["gpu"]},
        },
    }
    async with start_outpost(NEVER_READY, **traits) as op:
        a, b = (hub_client(op.address, pki, pki.hubs[hub], timeout=30) for hub in ("hub-a", "hub-b"))
        async with a, b:
            for i in range(2):
                await a.start(f"a{i}", sid(), user_name=f"ann{i}", flavor="shared")
            with pytest.raises(FlavorLimitReached) as e:
                await a.start("a2", sid(), user_name="ann2", flavor="shared")
            assert e.value.metadata == {"flavor": "shared", "limit": "hub", "max": "2", "in_use": "2"}
            assert "Your hub's share of flavor 'shared'" in e.value.message
            await b.start("b0", sid(), user_name="bob0", flavor="shared")
            with pytest.raises(FlavorLimitReached) as e:
                await b.start("b1", sid(), user_name="bob1", flavor="shared")
            assert e.value.metadata["limit"] == "total"
            # gpu: only hub-b's group gpu; hub-a does not even see it
            with pytest.raises(UnknownFlavor) as e:
                await a.start("a3", sid(), user_name="ann", groups=["gpu"], flavor="gpu")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == UNKNOWN_FLAVOR
            assert e.value.message.startswith("This Outpost has no flavor 'gpu' for your hub")
            with pytest.raises(UnknownFlavor) as unknown:
                await a.start("a3", sid(), user_name="ann", groups=["gpu"], flavor="no-such")
            assert unknown.value.message.replace("no-such", "gpu") == e.value.message
            with pytest.raises(FlavorNotAllowed, match="not for your groups") as e:
                await b.start("b2", sid(), user_name="bob", flavor="gpu")
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and e.value.reason == FLAVOR_NOT_ALLOWED
            assert (await b.start("b2", sid(), user_name="bob", groups=["gpu"], flavor="gpu")).created
            assert [f.name for f in (await a.list_flavors("ann", groups=["gpu"])).flavors] == ["shared"]
            listed = {f.name: f for f in (await b.list_flavors("bob")).flavors}
            assert (listed["shared"].in_use_total, listed["shared"].in_use_hub) == (3, 1)
            assert not listed["gpu"].available and "not for your groups" in listed["gpu"].unavailable_reason
            assert (await b.list_flavors("bob", groups=["gpu"])).flavors[0].in_use_user == 1


async def test_wait_until_ready_goes_through_the_same_admission(start_outpost):
    flavors = {"one": {"max_total": 1, "default": True}}
    async with start_outpost(flavors=flavors) as op:
        r = await op.client.start("a", sid(), user_name="ann", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_RUNNING and r.status.flavor == "one"
        with pytest.raises(FlavorLimitReached):
            await op.client.start("b", sid(), user_name="bob", wait_until_ready=True)


async def test_the_flavors_config_wins_over_the_hubs_overrides(start_outpost):
    flavors = {"quick": {"config": {"delay": 0.01}, "default": True}}
    traits = {"flavors": flavors, "allow_override": ["delay", "steps"], "SlowSpawner.delay": 3600.0}
    async with start_outpost(SLOW, **traits) as op:
        r = await op.client.start(
            "a", sid(), user_name="ann", config_overrides={"delay": 3600, "steps": 1}, wait_until_ready=True
        )
        assert r.status.state == pb.SERVER_STATE_RUNNING
        spawner = op.manager.records[("default", "a")].spawner
        assert (spawner.delay, spawner.steps) == (0.01, 1)


async def test_counts_come_back_from_the_database_after_a_restart(start_outpost, tmp_path):
    db = f"sqlite:///{tmp_path}/flavors.sqlite"
    traits = {"flavors": {"small": {"max_total": 3, "config": {"delay": 3600.0}}}, "db_url": db}
    async with start_outpost(SLOW, **{**traits, "flavors": {"small": {"max_total": 3}}}) as op:
        for i in range(2):
            await op.client.start(f"s{i}", sid(), user_name=f"u{i}", flavor="small", wait_until_ready=True)
    # restarted (the flavor's config changed meanwhile): memory is what the database says
    async with start_outpost(SLOW, **traits) as op:
        listed = await op.client.list_flavors("u0")
        assert (listed.flavors[0].in_use_total, listed.flavors[0].in_use_user) == (2, 1)
        assert (await op.client.poll("s0")).flavor == "small"
        # the restored server keeps the configuration it was admitted under
        assert op.manager.records[("default", "s0")].spawner.delay == 1.0
        await op.client.start("s2", sid(), user_name="u2", flavor="small")
        with pytest.raises(FlavorLimitReached):
            await op.client.start("s3", sid(), user_name="u3", flavor="small")


async def test_a_database_from_before_flavors_opens_after_upgrade_db(start_outpost, db_url):
    async with start_outpost(db_url=db_url) as op:
        await op.client.start("old", sid(), user_name="ann", wait_until_ready=True)

    async def sql(*statements):
        engine = create_async_engine(async_url(db_url))
        try:
            async with engine.begin() as conn:
                results = [await conn.exec_driver_sql(statement) for statement in statements]
                return [r.fetchall() if r.returns_rows else None for r in results]
        finally:
            await engine.dispose()

    await sql(  # as schema version 1 left it
        "ALTER TABLE outpost_servers DROP COLUMN flavor",
        "ALTER TABLE outpost_servers DROP COLUMN flavor_spec",
        "ALTER TABLE outpost_servers DROP COLUMN end_time",
        "ALTER TABLE outpost_servers DROP COLUMN stop_message",
        "ALTER TABLE outpost_servers DROP COLUMN auth_state",  # schema 3 (a later release)
        "UPDATE outpost_schema SET version = 1",
        f"DROP TABLE {migrations.VERSION_TABLE}",  # before alembic (tests/test_migrations.py)
    )
    with pytest.raises(migrations.SchemaOutdated):
        async with start_outpost(db_url=db_url):
            pass
    await migrations.upgrade_database(db_url, say=lambda _: None)
    async with start_outpost(db_url=db_url, flavors={"small": {"default": True}}) as op:
        status = await op.client.poll("old")
        assert status.state == pb.SERVER_STATE_RUNNING and status.flavor == ""
        assert (await op.client.start("new", sid(), user_name="ann")).status.flavor == "small"
    version, servers = await sql("SELECT version FROM outpost_schema", "SELECT server_name, flavor FROM outpost_servers")
    assert [tuple(r) for r in version] == [(SCHEMA_VERSION,)]  # upgraded to the newest
    assert dict(tuple(r) for r in servers) == {"old": "", "new": "small"}


# --- the Outpost process: grpcurl, SIGHUP, SIGKILL -----------------------------------------

PROCESS_CONFIG = """
c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"
c.Outpost.flavors_file = {flavors_file!r}
c.Outpost.max_concurrent_starts_per_hub = 0
c.Outpost.db_url = {db_url!r}
"""


@pytest.mark.slow
async def test_sighup_reloads_the_flavors_file_and_keeps_running_servers(outpost_process, tmp_path):
    flavors_file = tmp_path / "flavors.yaml"
    flavors_file.write_text("small:\n  display_name: Small\n  max_total: 1\n  default: true\n")
    op = outpost_process(PROCESS_CONFIG.format(flavors_file=str(flavors_file), db_url=f"sqlite:///{tmp_path}/o.sqlite"))
    op.start()
    await op.wait_serving()
    method = "jupyterhub.outpost.v1.OutpostService/ListFlavors"
    async with OutpostClient(op.address) as client:
        r = await client.start("keep", sid(), user_name="ann", wait_until_ready=True)
        assert r.status.flavor == "small"

        # grpcurl, as an operator (or a hub's form) asks
        out = await asyncio.to_thread(grpcurl, "-plaintext", "-d", '{"user": {"name": "ann"}}', op.address, method)
        assert out.returncode == 0, out.stderr
        small = json.loads(out.stdout)["flavors"][0]
        assert small["name"] == "small" and small["display_name"] == "Small" and small["in_use_total"] == 1
        assert small.get("available", False) is False
        assert small["unavailable_reason"] == "The one server of flavor 'small' is in use. Try again when it is stopped, or choose another flavor."


        flavors_file.write_text("big:\n  max_per_user: 2\n  default: true\n")
        op.proc.send_signal(signal.SIGHUP)
        await op.wait_log("Flavors reloaded: big")
        listed = await client.list_flavors("ann")
        assert [f.name for f in listed.flavors] == ["big"] and listed.default_flavor == "big"
        assert listed.user_in_use_total == 1  # the running server counts towards the user's total
        status = await client.poll("keep")  # untouched, still under its flavor
        assert status.state == pb.SERVER_STATE_RUNNING and status.flavor == "small"
        with pytest.raises(UnknownFlavor):
            await client.start("again", sid(), user_name="ann", flavor="small")
        assert (await client.start("new", sid(), user_name="ann")).status.flavor == "big"

        flavors_file.write_text("big: [not, a, flavor\n")  # a bad file: logged, the flavors kept
        op.proc.send_signal(signal.SIGHUP)
        await op.wait_log("Flavors not reloaded, keeping the 1 before")
        assert [f.name for f in (await client.list_flavors("ann")).flavors] == ["big"]
        assert op.proc.poll() is None


@pytest.mark.slow
async def test_sigkill_during_200_concurrent_starts_admits_at_most_the_limit(db_url, outpost_process, tmp_path):
    flavors_file = tmp_path / "flavors.yaml"
    flavors_file.write_text("small:\n  max_total: 7\n")
    op = outpost_process(PROCESS_CONFIG.format(flavors_file=str(flavors_file), db_url=db_url))
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address, timeout=30) as client:
        starts = [
            asyncio.ensure_future(client.start(f"s{i}", sid(), user_name=f"u{i}", flavor="small")) for i in range(200)
        ]
        await wait_for(lambda: sum(t.done() for t in starts) >= 3, timeout=30)
        op.kill(signal.SIGKILL)
        results = await asyncio.gather(*starts, return_exceptions=True)
    answered = [r for r in results if isinstance(r, pb.StartResponse)]
    assert len(answered) <= 7

    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address, timeout=30) as client:
        servers = await client.list_servers()
        active = [s for s in servers if s.state != pb.SERVER_STATE_STOPPED]
        # every start answered before the kill was persisted; none beyond the limit
        assert {r.status.server_name for r in answered} <= {s.server_name for s in servers}
        assert len(active) <= 7 and all(s.flavor == "small" for s in servers)
        listed = await client.list_flavors("someone")
        assert listed.flavors[0].in_use_total == len(active)

        results = await asyncio.gather(
            *(client.start(f"t{i}", sid(), user_name=f"v{i}", flavor="small") for i in range(200)),
            return_exceptions=True,
        )
        accepted, refused = outcome(results)
        assert len(accepted) == 7 - len(active) and len(refused) == 200 - len(accepted)
        assert (await client.list_flavors("someone")).flavors[0].in_use_total == 7
    op.stop()
    if db_url.startswith("sqlite:///"):  # and the database says the same
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute("SELECT state FROM outpost_servers WHERE flavor = 'small'").fetchall()
        assert len([r for r in rows if r[0] != "stopped"]) == 7
