"""c.Outpost.max_concurrent_starts_per_hub with start_admission "refuse": a hub's starts
beyond the limit are refused (RESOURCE_EXHAUSTED, TOO_MANY_STARTS), leave nothing behind,
and never touch other hubs. (The default, "queue": tests/test_admission.py.)"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from outpost_client import ResourceExhausted, ServerAlreadyStarted, ServerNotFound, pb
from outpost_client.errors import TOO_MANY_STARTS

from .harness.hub import hub_client
from .harness.util import sid

pytestmark = pytest.mark.rpc

NEVER_READY = "outpost_server.testing.NeverReadySpawner"


async def stored_names(op) -> set[tuple[str, str]]:
    rows, _ = await op.app.store.load()
    return {(row["hub"], row["server_name"]) for row in rows}


async def test_starts_beyond_the_limit_are_refused(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=2, start_admission="refuse") as op:
        c = op.client
        first, second = sid(), sid()
        assert (await c.start("s1", first, user_name="ann")).created
        assert (await c.start("s2", second, user_name="ann")).created

        with pytest.raises(ResourceExhausted) as err:
            await c.start("s3", sid(), user_name="ann")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.reason == TOO_MANY_STARTS
        assert err.value.metadata == {"limit": "2"}
        assert "Hub 'default' already has 2 server starts in progress" in err.value.message
        assert "try again when one of them finishes" in err.value.message
        # nothing kept, nothing persisted for the refused start
        assert ("default", "s3") not in op.manager.records
        assert await stored_names(op) == {("default", "s1"), ("default", "s2")}
        with pytest.raises(ServerNotFound):
            await c.poll("s3")

        # an idempotent retry of an accepted start is never refused
        again = await c.start("s1", first, user_name="ann")
        assert not again.created and again.status.start_id == first
        assert again.status.state == pb.SERVER_STATE_STARTING
        # another start_id of a starting server is still "already started", not the limit
        with pytest.raises(ServerAlreadyStarted):
            await c.start("s2", sid(), user_name="ann")

        # a Stop frees a slot
        assert (await c.stop("s1", first)).outcome == pb.STOP_OUTCOME_STOPPED
        third = sid()
        assert (await c.start("s3", third, user_name="ann")).created
        with pytest.raises(ResourceExhausted):
            await c.start("s4", sid(), user_name="ann")
        assert not (await c.start("s3", third, user_name="ann")).created
        assert await stored_names(op) == {("default", "s2"), ("default", "s3")}


async def test_a_start_that_finished_frees_its_slot(start_outpost):
    async with start_outpost(max_concurrent_starts_per_hub=1) as op:  # InstantSpawner
        for name in ("a", "b", "c"):
            r = await op.client.start(name, sid(), user_name=name, wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_RUNNING


async def test_zero_means_no_limit(start_outpost):
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=0) as op:
        results = await asyncio.gather(*(op.client.start(f"s{i}", sid(), user_name="u") for i in range(40)))
        assert all(r.created for r in results)


async def test_concurrent_starts_take_exactly_the_limit(start_outpost):
    """The check and the taking of the record are one step: a burst cannot overshoot."""
    async with start_outpost(NEVER_READY, max_concurrent_starts_per_hub=3, start_admission="refuse") as op:
        results = await asyncio.gather(
            *(op.client.start(f"s{i}", sid(), user_name="u") for i in range(30)), return_exceptions=True
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(accepted) == 3 and len(refused) == 27, results
        assert len(await stored_names(op)) == 3


# --- two hubs over mTLS -------------------------------------------------------------------


async def test_a_flooding_hub_does_not_starve_another(start_outpost, pki):
    limit, flood = 4, 300
    traits = {
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "tls_client_ca": pki.ca.cert,
        "max_concurrent_starts_per_hub": limit,
        "start_admission": "refuse",
        # hub-a's starts never finish; hub-b may make its own start instant
        "allow_override": {"hub-b": ["delay"]},
        "SlowSpawner.delay": 3600.0,
    }
    async with start_outpost("outpost_server.testing.SlowSpawner", **traits) as op:
        a, b = (hub_client(op.address, pki, pki.hubs[hub], timeout=30) for hub in ("hub-a", "hub-b"))
        async with a, b:
            bob = sid()
            r = await b.start("bob", bob, user_name="bob", config_overrides={"delay": 0}, wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_RUNNING

            latencies: list[float] = []
            flooding = asyncio.Event()
            done = asyncio.Event()

            async def poll_bob():
                while not done.is_set():
                    t0 = time.perf_counter()
                    status = await b.poll("bob")  # raises if any Poll fails
                    latencies.append(time.perf_counter() - t0)
                    assert status.state == pb.SERVER_STATE_RUNNING and status.start_id == bob
                    await asyncio.sleep(0.005)

            async def flood_a():
                flooding.set()
                try:
                    return await asyncio.gather(
                        *(a.start(f"a{i}", sid(), user_name=f"a{i}") for i in range(flood)),
                        return_exceptions=True,
                    )
                finally:
                    done.set()

            poller = asyncio.create_task(poll_bob())
            t0 = time.perf_counter()
            results = await flood_a()
            elapsed = time.perf_counter() - t0
            await poller

            accepted = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, ResourceExhausted) and r.reason == TOO_MANY_STARTS]
            assert len(accepted) == limit and len(refused) == flood - limit, [
                r for r in results if isinstance(r, BaseException) and not isinstance(r, ResourceExhausted)
            ][:3]

            assert latencies, "hub-b polled nothing during the flood"
            ordered = sorted(latencies)
            p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
            print(
                f"\nflood: {flood} Starts of hub-a in {elapsed * 1e3:.0f} ms ({len(accepted)} accepted, "
                f"{len(refused)} refused); hub-b: {len(latencies)} Polls, median "
                f"{statistics.median(latencies) * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms, max {ordered[-1] * 1e3:.1f} ms"
            )
            assert p95 < 1.0

            # hub-b's own limit is untouched by hub-a's full one
            assert (await b.start("bea", sid(), user_name="bea")).created

            # hub-a cannot see, poll or stop hub-b's server
            assert "bob" not in {s.server_name for s in await a.list_servers(page_size=1000)}
            with pytest.raises(ServerNotFound):
                await a.poll("bob")
            assert (await a.stop("bob", bob)).outcome == pb.STOP_OUTCOME_NOT_FOUND
            assert (await b.poll("bob")).state == pb.SERVER_STATE_RUNNING

            # nothing of the refused starts was kept or persisted
            assert sum(1 for (hub, _) in op.manager.records if hub == "hub-a") == limit
            stored = await stored_names(op)
            assert sum(1 for (hub, _) in stored if hub == "hub-a") == limit
            assert ("hub-b", "bob") in stored
