"""Admission under a burst (c.Outpost.start_admission, flavor_admission): a start beyond a
limit waits in a queue, its user told how many are ahead, and proceeds when a slot frees;
bounded in length and time; a Stop takes it out; "refuse" keeps the old refusal."""

from __future__ import annotations

import asyncio

import pytest

from outpost_client import ResourceExhausted, pb
from outpost_client.errors import TOO_MANY_STARTS

from .harness.hub import hub_client
from .harness.util import sid, wait_for

pytestmark = pytest.mark.rpc

SLOW = "outpost_server.testing.SlowSpawner"
NEVER_READY = "outpost_server.testing.NeverReadySpawner"
RECORDING = "outpost_server.testing.RecordingSpawner"
ONE_AT_A_TIME = "this Outpost starts at most 1 server of your hub at a time"


async def follow(
    client, name: str, start_id: str, log: list[tuple[str, pb.EventsResponse]]
) -> pb.EventsResponse:
    """Every event of one start into log (as (name, event)), until its terminal one."""
    async for event in client.events(name, start_id=start_id):
        log.append((name, event))
        if event.kind in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED):
            return event
    raise AssertionError(f"the events of {name} ended without a terminal event")


def messages(log, name: str) -> list[str]:
    return [event.message for who, event in log if who == name]


async def test_admission_queue_second_start_waits_then_proceeds(start_outpost):
    """Limit 1, three starts: the second and third are accepted, wait with their place in
    line, and each starts only after the one before it is ready; all three get ready."""
    async with start_outpost(RECORDING, max_concurrent_starts_per_hub=1, **{"SlowSpawner.delay": 0.4}) as op:
        c = op.client
        ids = {name: sid() for name in ("s1", "s2", "s3")}
        answers = [await c.start(name, ids[name], user_name=name) for name in ids]
        assert all(a.created and a.status.state == pb.SERVER_STATE_STARTING for a in answers)
        log: list = []
        finals = await asyncio.gather(*(follow(c, name, ids[name], log) for name in ids))
        assert [f.kind for f in finals] == [pb.EVENT_KIND_READY] * 3, finals

        assert messages(log, "s2")[0] == f"You are next, waiting for a free slot: {ONE_AT_A_TIME}."
        assert messages(log, "s3")[:2] == [
            f"1 user ahead of you, waiting for a free slot: {ONE_AT_A_TIME}.",
            f"You are next, waiting for a free slot: {ONE_AT_A_TIME}.",
        ]
        # in order, one at a time: a start's first Spawner event comes after the READY of
        # the one before it
        order = [(who, e.kind, e.message) for who, e in log]
        for before, after in (("s1", "s2"), ("s2", "s3")):
            ready = next(
                i for i, (who, kind, _) in enumerate(order) if who == before and kind == pb.EVENT_KIND_READY
            )
            first_step = order.index((after, pb.EVENT_KIND_PROGRESS, "Step 1 of 4"))
            assert ready < first_step, order
        from outpost_server.testing import RecordingSpawner

        assert len(RecordingSpawner.started) == 3


async def test_admission_queue_bound_refuses_with_resource_exhausted(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=1, start_queue_limit=1) as op:
        c = op.client
        assert (await c.start("s1", sid(), user_name="a")).created
        queued = await c.start("s2", sid(), user_name="b")
        assert queued.created and queued.status.state == pb.SERVER_STATE_STARTING
        with pytest.raises(ResourceExhausted) as err:
            await c.start("s3", sid(), user_name="c")
        assert err.value.reason == TOO_MANY_STARTS
        assert "1 server starts in progress and 1 waiting" in err.value.message, err.value.message
        assert err.value.metadata == {"limit": "1", "queue_limit": "1"}
        assert ("default", "s3") not in op.manager.records


async def test_admission_queue_timeout_fails_with_a_message(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=1, start_queue_timeout=0.3) as op:
        c = op.client
        assert (await c.start("s1", sid(), user_name="a")).created
        second = sid()
        assert (await c.start("s2", second, user_name="b")).created
        log: list = []
        final = await follow(c, "s2", second, log)
        assert final.kind == pb.EVENT_KIND_FAILED
        assert final.message == f"No slot freed within 0.3 seconds ({ONE_AT_A_TIME}). Please try again later."
        assert final.error_class == "QueueTimeout"
        assert (await c.poll("s1")).state == pb.SERVER_STATE_STARTING  # the first is untouched


async def test_admission_stop_of_a_queued_start_removes_it(start_outpost):
    """A Stop of a queued start: gone at once, its Spawner never started nor stopped; the
    start behind it moves up, and starts when the first one's slot frees."""
    async with start_outpost(
        RECORDING, max_concurrent_starts_per_hub=1, **{"SlowSpawner.delay": 3600.0}
    ) as op:
        from outpost_server.testing import RecordingSpawner

        c = op.client
        ids = {name: sid() for name in ("s1", "s2", "s3")}
        for name in ids:
            assert (await c.start(name, ids[name], user_name=name)).created
        log: list = []
        follower = asyncio.create_task(follow(c, "s3", ids["s3"], log))
        await wait_for(lambda: messages(log, "s3"), timeout=10, message="no queue message for s3")
        assert messages(log, "s3")[0].startswith("1 user ahead of you")
        spawner2 = op.manager.records[("default", "s2")].spawner

        assert (await c.stop("s2", ids["s2"])).outcome == pb.STOP_OUTCOME_STOPPED
        assert ("default", "s2") not in op.manager.records
        assert not spawner2.stopped, "a queued start's Spawner never ran: nothing to stop"
        assert [s for s in RecordingSpawner.started if s is spawner2] == []
        await wait_for(
            lambda: messages(log, "s3")[-1].startswith("You are next"),
            timeout=10,
            message=str(messages(log, "s3")),
        )
        rows, _ = await op.app.store.load()
        assert {row["server_name"] for row in rows} == {"s1", "s3"}

        # the first one's slot frees (stopped): s3 proceeds
        assert (await c.stop("s1", ids["s1"])).outcome == pb.STOP_OUTCOME_STOPPED
        await wait_for(
            lambda: "Step 1 of 4" in messages(log, "s3"), timeout=10, message=str(messages(log, "s3"))
        )
        follower.cancel()
        assert len(RecordingSpawner.started) == 2  # s1 and s3


async def test_admission_refuse_mode_keeps_refusing(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=1, start_admission="refuse") as op:
        assert (await op.client.start("s1", sid(), user_name="a")).created
        with pytest.raises(ResourceExhausted) as err:
            await op.client.start("s2", sid(), user_name="b")
        assert err.value.reason == TOO_MANY_STARTS
        assert "already has 1 server starts in progress on this Outpost (the limit)" in err.value.message
        assert ("default", "s2") not in op.manager.records


async def test_admission_queue_at_shutdown_fails_the_waiting_start(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=1) as op:
        assert (await op.client.start("s1", sid(), user_name="a")).created
        assert (await op.client.start("s2", sid(), user_name="b")).created
        store = op.app.store
        await op.manager.shutdown(0.5)
        rec = op.manager.records[("default", "s2")]
        assert rec.state == pb.SERVER_STATE_STOPPED
        assert rec.failure_message.startswith(
            "The Outpost was stopped while your server waited for a free slot"
        )
        rows, _ = await store.load()
        assert {r["server_name"]: r["state"] for r in rows}["s2"] == "stopped"


# --- a flavor's limit -------------------------------------------------------------------------


async def test_admission_flavor_queue_waits_for_its_flavor_and_lets_others_pass(start_outpost):
    flavors = {"gpu": {"max_total": 1}, "cpu": {}}
    async with start_outpost(flavors=flavors, flavor_admission="queue") as op:  # InstantSpawner
        c = op.client
        first = await c.start("g1", sid(), user_name="ann", flavor="gpu", wait_until_ready=True)
        assert first.status.state == pb.SERVER_STATE_RUNNING
        second = sid()
        assert (await c.start("g2", second, user_name="bob", flavor="gpu")).created
        log: list = []
        follower = asyncio.create_task(follow(c, "g2", second, log))
        await wait_for(lambda: messages(log, "g2"), timeout=10, message="no queue message")
        assert messages(log, "g2")[0] == (
            "You are next, waiting for a free slot: every server of flavor 'gpu' that may run is in use."
        )
        # another flavor passes the waiting one
        other = await c.start("c1", sid(), user_name="cid", flavor="cpu", wait_until_ready=True)
        assert other.status.state == pb.SERVER_STATE_RUNNING
        assert (await c.poll("g2")).state == pb.SERVER_STATE_STARTING
        # the gpu server stops: the waiting one gets it
        await c.stop("g1")
        final = await follower
        assert final.kind == pb.EVENT_KIND_READY


async def test_admission_flavor_queue_is_fair_across_hubs(start_outpost, pki):
    """One gpu server for everyone; hub-a queues two starts, then hub-b one: as slots free,
    hub-b's turn comes before hub-a's second (round robin over hubs, FIFO within one)."""
    traits = {
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "tls_client_ca": pki.ca.cert,
        "flavors": {"gpu": {"max_total": 1}},
        "flavor_admission": "queue",
    }
    async with start_outpost(**traits) as op:
        a, b = (hub_client(op.address, pki, pki.hubs[hub], timeout=30) for hub in ("hub-a", "hub-b"))
        async with a, b:
            assert (await a.start("x", sid(), user_name="x", flavor="gpu", wait_until_ready=True)).created
            for name in ("a1", "a2"):
                assert (await a.start(name, sid(), user_name=name, flavor="gpu")).created
            assert (await b.start("b1", sid(), user_name="b1", flavor="gpu")).created
            order = []
            for client, running in ((a, "x"), (None, None), (None, None)):
                if client is not None:
                    await client.stop(running)
                else:  # stop the one that got the slot last
                    hub_client_, name = order[-1]
                    await hub_client_.stop(name)

                async def next_running():
                    for cl, name in ((a, "a1"), (a, "a2"), (b, "b1")):
                        if (cl, name) not in order and (await cl.poll(name)).state == pb.SERVER_STATE_RUNNING:
                            order.append((cl, name))
                            return True
                    return False

                await wait_for(next_running, timeout=10, message=f"nobody admitted after {order}")
            assert [name for _, name in order] == ["a1", "b1", "a2"]
