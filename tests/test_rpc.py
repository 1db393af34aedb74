"""The contract against a real server and the real client: semantics and bad input."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from outpost_client import (
    DeadlineExceeded,
    InvalidArgument,
    OutpostClient,
    OverrideNotAllowed,
    ResourceExhausted,
    ServerAlreadyStarted,
    ServerNotFound,
    StartNotFound,
    pb,
)

from outpost_server.testing import SlowSpawner

from .harness.util import collect, sid, wait_for

pytestmark = pytest.mark.rpc

ENV = {"JUPYTERHUB_API_TOKEN": "secret-token", "JUPYTERHUB_API_URL": "http://hub:8081/hub/api"}


async def test_start_events_poll_stop(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.4}) as op:
        c = op.client
        start_id = sid()
        r = await c.start("alice", start_id, user_name="alice", env=ENV)
        assert r.created
        assert r.status.state == pb.SERVER_STATE_STARTING
        assert (await c.poll("alice")).state == pb.SERVER_STATE_STARTING

        events = await collect(c, "alice")
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        messages = [e.message for e in events]
        # the Spawner's own progress() messages, then the terminal event
        assert "Step 1 of 4" in messages
        assert events[-1].kind == pb.EVENT_KIND_READY
        assert events[-1].address.port == 23456
        assert all(e.kind == pb.EVENT_KIND_PROGRESS for e in events[:-1])

        status = await c.poll("alice")
        assert status.state == pb.SERVER_STATE_RUNNING
        assert (status.address.host, status.address.port) == ("127.0.0.1", 23456)
        assert status.user_name == "alice"

        stop = await c.stop("alice", start_id)
        assert stop.outcome == pb.STOP_OUTCOME_STOPPED
        with pytest.raises(ServerNotFound):
            await c.poll("alice")


async def test_start_message_comes_first(start_outpost):
    async with start_outpost(
        "outpost_server.testing.SlowSpawner",
        start_message="Site X: starting {user}'s server with {spawner_class}",
        **{"SlowSpawner.delay": 0.1},
    ) as op:
        await op.client.start("zoe", sid(), user_name="zoe", wait_until_ready=True)
        events = await collect(op.client, "zoe")
        assert events[0].message == "Site X: starting zoe's server with SlowSpawner"
        assert events[1].message == "Step 1 of 4"


async def test_events_resume_after_sequence(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.2}) as op:
        await op.client.start("bob", sid(), user_name="bob", wait_until_ready=True)
        everything = await collect(op.client, "bob")
        resumed = await collect(op.client, "bob", after_sequence=2)
        assert [e.sequence for e in resumed] == [e.sequence for e in everything if e.sequence > 2]
        assert resumed[-1].kind == pb.EVENT_KIND_READY


async def test_events_follow_live_start_and_client_disconnect(start_outpost):
    """A client that stops reading loses nothing: it resumes from the last sequence."""
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.6}) as op:
        await op.client.start("carol", sid(), user_name="carol")
        first = None
        async for event in op.client.events("carol"):
            first = event
            break  # disconnect mid-stream
        rest = await collect(op.client, "carol", after_sequence=first.sequence)
        assert rest[0].sequence == first.sequence + 1
        assert rest[-1].kind == pb.EVENT_KIND_READY


async def test_client_gone_mid_start_loses_nothing(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 1.0}) as op:
        start_id = sid()
        with pytest.raises(DeadlineExceeded):
            await op.client.start("olaf", start_id, user_name="olaf", wait_until_ready=True, timeout=0.3)
        # the start went on without the client; a retry attaches to it
        again = await op.client.start("olaf", start_id, user_name="olaf", wait_until_ready=True)
        assert not again.created
        assert again.status.state == pb.SERVER_STATE_RUNNING


async def test_start_is_idempotent_per_start_id(outpost):
    c = outpost.client
    start_id = sid()
    first = await c.start("dave", start_id, user_name="dave", wait_until_ready=True)
    again = await c.start("dave", start_id, user_name="dave", wait_until_ready=True)
    assert first.created and not again.created
    assert again.status.state == pb.SERVER_STATE_RUNNING
    servers = await c.list_servers()
    assert [s.server_name for s in servers] == ["dave"]


async def test_concurrent_identical_starts_start_once(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 0.2}) as op:
        start_id = sid()
        results = await asyncio.gather(
            *(op.client.start("erin", start_id, user_name="erin") for _ in range(8))
        )
        assert sum(r.created for r in results) == 1
        events = await collect(op.client, "erin")
        assert sum(e.kind == pb.EVENT_KIND_READY for e in events) == 1


async def test_start_under_another_start_id_is_refused(outpost):
    c = outpost.client
    first = sid()
    await c.start("frank", first, user_name="frank", wait_until_ready=True)
    with pytest.raises(ServerAlreadyStarted) as err:
        await c.start("frank", sid(), user_name="frank")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert first in err.value.message and "Stop it first" in err.value.message
    assert err.value.metadata["start_id"] == first
    # still the first start, untouched
    assert (await c.poll("frank")).start_id == first


async def test_stop_is_idempotent_and_never_stops_a_newer_start(outpost):
    c = outpost.client
    old, new = sid(), sid()
    await c.start("gina", old, user_name="gina", wait_until_ready=True)
    assert (await c.stop("gina", old)).outcome == pb.STOP_OUTCOME_STOPPED
    # a retried stop of the same start: success, nothing to do
    assert (await c.stop("gina", old)).outcome == pb.STOP_OUTCOME_NOT_FOUND
    await c.start("gina", new, user_name="gina", wait_until_ready=True)
    stale = await c.stop("gina", old)
    assert stale.outcome == pb.STOP_OUTCOME_STALE_START_ID
    assert stale.current.start_id == new
    assert (await c.poll("gina")).state == pb.SERVER_STATE_RUNNING


async def test_stop_unknown_server_succeeds_with_not_found(outpost):
    r = await outpost.client.stop("nobody-here")
    assert r.outcome == pb.STOP_OUTCOME_NOT_FOUND


async def test_poll_and_events_unknown_server_not_found(outpost):
    with pytest.raises(ServerNotFound) as err:
        await outpost.client.poll("ghost")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServerNotFound):
        await collect(outpost.client, "ghost")


async def test_events_for_another_start_id_not_found(outpost):
    await outpost.client.start("hank", sid(), user_name="hank", wait_until_ready=True)
    with pytest.raises(StartNotFound):
        await collect(outpost.client, "hank", start_id="not-this-one")


async def test_failing_spawner(start_outpost):
    async with start_outpost("outpost_server.testing.FailingSpawner") as op:
        c = op.client
        r = await c.start("ivy", sid(), user_name="ivy", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_STOPPED
        assert r.status.failure_message == "No GPU left for you today"
        events = await collect(c, "ivy")
        assert events[-1].kind == pb.EVENT_KIND_FAILED
        assert events[-1].message == "No GPU left for you today"
        assert events[-1].error_class == "QuotaExceeded"
        assert "Traceback" not in events[-1].message
        status = await c.poll("ivy")
        assert status.state == pb.SERVER_STATE_STOPPED
        # nothing half-persisted: the row says stopped, with no Spawner state
        rows, _ = await op.app.store.load()
        (row,) = rows
        assert row["state"] == "stopped" and row["spawner_state"] is None
        # the server can be started again with a new start_id
        again = await c.start("ivy", sid(), user_name="ivy")
        assert again.created
        # and the Outpost still serves others
        assert (await c.stop("ivy")).outcome == pb.STOP_OUTCOME_STOPPED


async def test_stop_cancels_a_pending_start(start_outpost):
    async with start_outpost("outpost_server.testing.NeverReadySpawner") as op:
        start_id = sid()
        await op.client.start("jack", start_id, user_name="jack")
        follower = asyncio.create_task(collect(op.client, "jack"))
        await asyncio.sleep(0.1)
        assert (await op.client.poll("jack")).state == pb.SERVER_STATE_STARTING
        r = await op.client.stop("jack", start_id)
        assert r.outcome == pb.STOP_OUTCOME_STOPPED
        # the Events stream of a stopped start ends instead of hanging
        await asyncio.wait_for(follower, 10)
        assert "jack" not in {n for (_, n) in op.manager.records}


async def test_start_timeout_from_spawner_config(start_outpost):
    async with start_outpost(
        "outpost_server.testing.NeverReadySpawner", **{"Spawner.start_timeout": 1}
    ) as op:
        r = await op.client.start("kate", sid(), user_name="kate", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_STOPPED
        assert "did not start within 1 seconds" in r.status.failure_message


async def test_poll_failure_reports_unknown_not_stopped(start_outpost):
    async with start_outpost("outpost_server.testing.FailingPollSpawner", poll_interval=0.1) as op:
        await op.client.start("lena", sid(), user_name="lena", wait_until_ready=True)
        await wait_for(
            lambda: op.manager.records[("default", "lena")].state == pb.SERVER_STATE_UNKNOWN
        )
        assert (await op.client.poll("lena")).state == pb.SERVER_STATE_UNKNOWN


async def test_manager_poll_notices_exit(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", poll_interval=0.1, **{"SlowSpawner.delay": 0}) as op:
        await op.client.start("mike", sid(), user_name="mike", wait_until_ready=True)
        op.manager.records[("default", "mike")].spawner.stopped = True  # the process "exits"
        await wait_for(lambda: op.manager.records[("default", "mike")].state == pb.SERVER_STATE_STOPPED)
        status = await op.client.poll("mike")
        assert status.state == pb.SERVER_STATE_STOPPED and status.exit_code == 0


async def test_list_servers_pages(outpost):
    c = outpost.client
    for i in range(7):
        await c.start(f"user{i}", sid(), user_name=f"user{i}")
    first = await c.stub.ListServers(pb.ListServersRequest(page_size=3))
    assert [s.server_name for s in first.servers] == ["user0", "user1", "user2"]
    assert first.next_page_token
    everything = await c.list_servers(page_size=3)
    assert [s.server_name for s in everything] == [f"user{i}" for i in range(7)]
    with pytest.raises(InvalidArgument):
        await c._call(c.stub.ListServers, pb.ListServersRequest(page_token="garbage!"), None)


async def test_many_concurrent_stops_do_not_stall(outpost):
    c = outpost.client
    ids = {f"s{i:02d}": sid() for i in range(16)}
    await asyncio.gather(*(c.start(n, s, user_name=n, wait_until_ready=True) for n, s in ids.items()))
    results = await asyncio.wait_for(
        asyncio.gather(*(c.stop(n, s) for n, s in ids.items())), timeout=10
    )
    assert all(r.outcome == pb.STOP_OUTCOME_STOPPED for r in results)
    assert await c.list_servers() == []


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "is required"),
        ("x" * 256, "at most 255"),
        ("alice/../../etc", "allowed set"),
        ("-leading-dash", "allowed set"),
        ("bad name", "allowed set"),
        ("ünïcode", "allowed set"),
    ],
)
async def test_bad_server_name(outpost, name, why):
    for call in (
        outpost.client.start(name, sid(), user_name="u"),
        outpost.client.poll(name),
        outpost.client.stop(name),
    ):
        with pytest.raises(InvalidArgument) as err:
            await call
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field == "server_name"
        assert "server_name" in err.value.message and why in err.value.message


async def test_longest_valid_server_name(outpost):
    name = "a" * 255
    r = await outpost.client.start(name, sid(), user_name="u", wait_until_ready=True)
    assert r.status.state == pb.SERVER_STATE_RUNNING


@pytest.mark.parametrize(
    "env, field",
    [
        ({"A=B": "x"}, "env"),
        ({"NUL\x00KEY": "x"}, "env"),
        ({"GOOD": "bad\x00value"}, "env[GOOD]"),
        ({"": "x"}, "env"),
    ],
)
async def test_bad_env(outpost, env, field):
    with pytest.raises(InvalidArgument) as err:
        await outpost.client.start("nora", sid(), user_name="nora", env=env)
    assert err.value.field == field
    with pytest.raises(ServerNotFound):
        await outpost.client.poll("nora")  # nothing was persisted or started


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"user_name": ""}, "user.name"),
        ({"user_name": "a/b"}, "user.name"),
        ({"user_name": "ok", "groups": [""]}, "user.groups[0]"),
    ],
)
async def test_bad_user(outpost, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        await outpost.client.start("olga", sid(), **kwargs)
    assert err.value.field == field


async def test_missing_start_id(outpost):
    with pytest.raises(InvalidArgument) as err:
        await outpost.client.start("pete", "", user_name="pete")
    assert err.value.field == "start_id" and "UUID" in err.value.message


def nested(depth: int) -> dict:
    deep: dict = {}
    node = deep
    for _ in range(depth - 1):
        node["x"] = {}
        node = node["x"]
    return deep


async def test_too_deep_user_options(start_outpost):
    async with start_outpost(allow_user_options=True) as outpost:
        ok = await outpost.client.start("quin", sid(), user_name="quin", user_options=nested(16))
        assert ok.created
        with pytest.raises(InvalidArgument) as err:
            await outpost.client.start("quin2", sid(), user_name="quin", user_options=nested(17))
        assert err.value.field == "user_options" and "at most 16" in err.value.message
        # deeper than protobuf itself parses: still a clean INVALID_ARGUMENT
        with pytest.raises(InvalidArgument) as err:
            await outpost.client.start("quin3", sid(), user_name="quin", config_overrides=nested(60))
        assert err.value.field == "request"
        assert (await outpost.client.poll("quin")).server_name == "quin"


async def test_overrides_denied_by_default(outpost):
    with pytest.raises(OverrideNotAllowed) as err:
        await outpost.client.start("rita", sid(), user_name="rita", config_overrides={"cmd": ["evil"]})
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.reason == "OVERRIDE_NOT_ALLOWED"
    with pytest.raises(ServerNotFound):
        await outpost.client.poll("rita")


async def test_allowed_override_applies_to_that_start_only(start_outpost):
    async with start_outpost(
        "outpost_server.testing.SlowSpawner", allow_override=["delay"], **{"SlowSpawner.delay": 0.0}
    ) as op:
        await op.client.start("sam", sid(), user_name="sam", config_overrides={"delay": 0.3}, wait_until_ready=True)
        await op.client.start("tim", sid(), user_name="tim", wait_until_ready=True)
        assert op.manager.records[("default", "sam")].spawner.delay == 0.3
        assert op.manager.records[("default", "tim")].spawner.delay == 0.0
        with pytest.raises(OverrideNotAllowed):
            await op.client.start("uma", sid(), user_name="uma", config_overrides={"steps": 1})
        with pytest.raises(InvalidArgument):
            await op.client.start("uma", sid(), user_name="uma", config_overrides={"delay": "slow"})


async def test_oversized_message_refused_others_served(start_outpost):
    async with start_outpost(max_message_bytes=64 * 1024) as op:
        other = OutpostClient(op.address)
        try:
            await other.start("vera", sid(), user_name="vera", wait_until_ready=True)
            with pytest.raises(ResourceExhausted) as err:
                await op.client.start("will", sid(), user_name="will", env={"BIG": "x" * 100_000})
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await other.poll("vera")).state == pb.SERVER_STATE_RUNNING
            # the refused client's channel still works too
            assert (await op.client.poll("vera")).state == pb.SERVER_STATE_RUNNING
        finally:
            await other.close()


async def test_errors_carry_error_info(outpost):
    """The raw status carries one google.rpc.ErrorInfo (for grpcurl and other clients)."""
    from google.rpc import error_details_pb2, status_pb2

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await outpost.client.stub.Poll(pb.PollRequest(server_name="ghost"))
    details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "SERVER_NOT_FOUND" and info.domain == "outpost.jupyterhub.org"


async def test_override_policy_per_hub_and_callable(start_outpost):
    """allow_override as a dict per hub, and a callable whose exception is the refusal."""

    def policy(hub, overrides):
        if overrides.get("delay", 0) > 1:
            raise ValueError("delay may be at most 1 second here")
        return ["delay"]

    async with start_outpost(
        "outpost_server.testing.SlowSpawner", allow_override={"default": policy}, **{"SlowSpawner.delay": 0.0}
    ) as op:
        r = await op.client.start("pia", sid(), user_name="pia", config_overrides={"delay": 0.1}, wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_RUNNING
        with pytest.raises(OverrideNotAllowed) as err:
            await op.client.start("quinn", sid(), user_name="quinn", config_overrides={"delay": 5})
        assert "at most 1 second" in err.value.message
        with pytest.raises(OverrideNotAllowed):
            await op.client.start("quinn", sid(), user_name="quinn", config_overrides={"steps": 1})


async def test_batch_poll(outpost):
    c = outpost.client
    for name in ("b1", "b2", "b3"):
        await c.start(name, sid(), user_name=name, wait_until_ready=True)
    await c.stop("b2")
    statuses, not_found = await c.batch_poll(["b3", "b1", "b2", "ghost", "b1"])
    assert [s.server_name for s in statuses] == ["b3", "b1"]  # asked order, once each
    assert all(s.state == pb.SERVER_STATE_RUNNING for s in statuses)
    assert not_found == ["b2", "ghost"]
    # the same answer as Poll, server by server
    assert statuses[0] == await c.poll("b3")


@pytest.mark.parametrize(
    "names, field",
    [([], "server_names"), (["ok", "bad name"], "server_names[1]"), (["a"] * 10001, "server_names")],
)
async def test_batch_poll_bad_input(outpost, names, field):
    with pytest.raises(InvalidArgument) as err:
        await outpost.client.batch_poll(names)
    assert err.value.field == field


class RepeatingSpawner(SlowSpawner):
    """progress() says the same thing again and again, as a queue poller does."""

    async def progress(self):
        for message in ["Pending in queue...", "Pending in queue...", "Pending in queue...", "Running"]:
            yield {"message": message}
            await asyncio.sleep(self.delay / 8)


async def test_repeated_progress_events_are_coalesced(start_outpost):
    async with start_outpost(RepeatingSpawner, **{"RepeatingSpawner.delay": 0.4}) as op:
        await op.client.start("rep", sid(), user_name="rep", wait_until_ready=True)
        events = await collect(op.client, "rep")
        assert [e.message for e in events if e.kind == pb.EVENT_KIND_PROGRESS] == [
            "Pending in queue...",
            "Running",
        ]
        assert events[-1].kind == pb.EVENT_KIND_READY
