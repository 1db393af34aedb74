"""A hub holds at most c.Outpost.max_servers_per_hub servers (RESOURCE_EXHAUSTED,
TOO_MANY_SERVERS), whatever their state, and stopped servers it never stops expire
(failed_server_retention, exited_server_retention): one hub cannot fill the Outpost,
for itself or for the others."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from jupyterhub.spawner import Spawner

from outpost_client import ResourceExhausted, ServerNotFound, TooManyServers, pb
from outpost_client.errors import TOO_MANY_SERVERS
from outpost_client.spawner import OutpostStartFailed
from outpost_server.testing import class_state, zoo_port

from .harness.hub import hub_client, make_spawner
from .harness.outpost import outpost_config, running_outpost
from .harness.util import sid, wait_for

pytestmark = pytest.mark.rpc

NEVER_READY = "outpost_server.testing.NeverReadySpawner"


@class_state("stopped")
class FloodSpawner(Spawner):
    """By user name: "fail..." fails its start, "exit..." starts and then exits (poll()
    answers 0), anything else starts and runs. ``stopped`` lists the users whose stop()
    ran (over all instances)."""

    stopped: list[str] = []

    async def start(self):
        await asyncio.sleep(0)
        if self.user.name.startswith("fail"):
            raise RuntimeError(f"no room for {self.user.name}")
        return ("127.0.0.1", zoo_port(self, 12345))  # apart between hubs

    async def poll(self):
        return 0 if self.user.name.startswith("exit") else None

    async def stop(self, now=False):
        FloodSpawner.stopped.append(self.user.name)


async def stored(op) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The (hub, server_name) of every stored row, and of every server with stored events."""
    rows, events = await op.app.store.load()
    return {(row["hub"], row["server_name"]) for row in rows}, set(events)


def held(op, hub: str = "default") -> set[str]:
    return set(op.manager.records.of_hub(hub))


# --- the cap ---------------------------------------------------------------------------------


async def test_a_hub_holds_at_most_max_servers_in_any_state(start_outpost):
    async with start_outpost(FloodSpawner, max_servers_per_hub=3) as op:
        c = op.client
        failed, running = sid(), sid()
        r = await c.start("f", failed, user_name="fail-f", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_STOPPED and r.status.failure_message
        await c.start("r", running, user_name="ron", wait_until_ready=True)
        await c.start("e", sid(), user_name="exit-e", wait_until_ready=True)
        await op.manager.poller.poll_all()
        assert (await c.poll("e")).state == pb.SERVER_STATE_STOPPED  # exited: still held

        with pytest.raises(TooManyServers) as err:
            await c.start("new", sid(), user_name="nina")
        e = err.value
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == TOO_MANY_SERVERS
        assert e.metadata == {"limit": "3"}
        assert "already holds 3 servers of your hub 'default'" in e.message
        assert "Stop a server you no longer need" in e.message
        # nothing kept or stored of the refused start
        assert held(op) == {"f", "r", "e"}
        assert (await stored(op))[0] == {("default", n) for n in ("f", "r", "e")}
        with pytest.raises(ServerNotFound):
            await c.poll("new")

        # never refused: an idempotent retry, and a new start of a name the hub holds
        again = await c.start("r", running, user_name="ron")
        assert not again.created and again.status.state == pb.SERVER_STATE_RUNNING
        restarted = await c.start("f", sid(), user_name="fred", wait_until_ready=True)
        assert restarted.created and restarted.status.state == pb.SERVER_STATE_RUNNING
        assert held(op) == {"f", "r", "e"}

        # a Stop frees a place
        await c.stop("e")
        assert (await c.start("new", sid(), user_name="nina")).created
        with pytest.raises(TooManyServers):
            await c.start("one-more", sid(), user_name="olga")


async def test_the_hubs_user_reads_what_to_do(start_outpost):
    """Through OutpostSpawner, as on the spawn page."""
    async with start_outpost(max_servers_per_hub=1) as op:
        first = make_spawner(op, "first")
        await first.start()
        with pytest.raises(OutpostStartFailed) as err:
            await make_spawner(op, "second").start()
        message = err.value.jupyterhub_message
        assert "already holds 1 server of your hub 'default', the most it allows" in message
        assert "Stop a server you no longer need, or ask your hub's administrators" in message
        await first.stop()
        second = make_spawner(op, "second")
        await second.start()
        await second.stop()


async def test_per_hub_limits_and_zero_for_none(start_outpost):
    async with start_outpost(NEVER_READY, max_servers_per_hub=1, max_servers_by_hub={"default": 2}) as op:
        assert (await op.client.start("a", sid(), user_name="u")).created
        assert (await op.client.start("b", sid(), user_name="u")).created
        with pytest.raises(TooManyServers) as err:
            await op.client.start("c", sid(), user_name="u")
        assert err.value.metadata == {"limit": "2"}
        assert op.manager.admission.server_limit("another-hub") == 1
    async with start_outpost(NEVER_READY, max_servers_per_hub=0, max_concurrent_starts_per_hub=0) as op:
        results = await asyncio.gather(*(op.client.start(f"s{i}", sid(), user_name="u") for i in range(60)))
        assert all(r.created for r in results)


async def test_concurrent_starts_take_exactly_the_servers_allowed(start_outpost):
    """The check and the taking of the record are one step: a burst cannot overshoot."""
    async with start_outpost(NEVER_READY, max_servers_per_hub=5, max_concurrent_starts_per_hub=0) as op:
        results = await asyncio.gather(
            *(op.client.start(f"s{i}", sid(), user_name="u") for i in range(40)), return_exceptions=True
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, TooManyServers)]
        assert len(accepted) == 5 and len(refused) == 35, results
        assert len(held(op)) == 5 and len((await stored(op))[0]) == 5


async def test_a_flooding_hub_fills_only_its_own_share(start_outpost, pki):
    """hub-a sends waves of Starts (half of them fail) until it is refused
    TOO_MANY_SERVERS; hub-b starts, polls and stops servers normally throughout."""
    limit, wave = 60, 20
    traits = {
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "tls_client_ca": pki.ca.cert,
        "max_servers_by_hub": {"hub-a": limit},
        "max_servers_per_hub": 10,  # hub-b's
    }
    async with start_outpost(FloodSpawner, **traits) as op:
        a, b = (hub_client(op.address, pki, pki.hubs[hub], timeout=30) for hub in ("hub-a", "hub-b"))
        async with a, b:
            done = asyncio.Event()
            b_rounds = 0

            async def hub_b_as_usual():
                # start a server, poll it, stop it: again and again while hub-a floods
                nonlocal b_rounds
                while not done.is_set():
                    name, start_id = f"b{b_rounds % 3}", sid()
                    r = await b.start(name, start_id, user_name="bea", wait_until_ready=True)
                    assert r.status.state == pb.SERVER_STATE_RUNNING, r.status
                    for _ in range(3):
                        status = await b.poll(name)
                        assert status.state == pb.SERVER_STATE_RUNNING and status.start_id == start_id
                    assert (await b.stop(name, start_id)).outcome == pb.STOP_OUTCOME_STOPPED
                    b_rounds += 1

            async def hub_a_floods():
                results, n = [], 0
                try:
                    while n < 20 * limit:  # bounded: the cap must stop it long before
                        batch = [
                            a.start(f"a{i}", sid(), user_name=f"fail{i}" if i % 2 else f"ann{i}")
                            for i in range(n, n + wave)
                        ]
                        n += wave
                        results += await asyncio.gather(*batch, return_exceptions=True)
                        if any(isinstance(r, TooManyServers) for r in results):
                            return results
                        # the wave's starts end (half fail, half run) before the next: a
                        # wave stays below max_concurrent_starts_per_hub, so only the cap
                        # on servers refuses
                        await wait_for(lambda: all(r.terminal for r in op.manager.records.of_hub("hub-a").values()))
                    return results
                finally:
                    done.set()

            b_task = asyncio.create_task(hub_b_as_usual())
            results = await hub_a_floods()
            await b_task  # re-raises any failure of hub-b's starts, polls or stops

            accepted = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, ResourceExhausted)]
            others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ResourceExhausted)]
            assert not others, others[:3]
            assert len(accepted) == limit, (len(accepted), len(refused))
            assert refused and {r.reason for r in refused} == {TOO_MANY_SERVERS}
            assert b_rounds >= 1, "hub-b got nothing done during the flood"

            # hub-a is full (failed starts count), hub-b is not
            await wait_for(lambda: all(r.terminal for r in op.manager.records.of_hub("hub-a").values()))
            states = [r.state for r in op.manager.records.of_hub("hub-a").values()]
            assert len(states) == limit and pb.SERVER_STATE_STOPPED in states and pb.SERVER_STATE_RUNNING in states
            with pytest.raises(TooManyServers):
                await a.start("a-late", sid(), user_name="ann")
            assert (await b.start("bob", sid(), user_name="bob", wait_until_ready=True)).created

            rows = (await stored(op))[0]
            assert sum(1 for hub, _ in rows if hub == "hub-a") == limit
            assert ("hub-b", "bob") in rows

            # hub-a frees its own places by stopping; nothing of hub-b's is touched
            failed = sorted(n for n, r in op.manager.records.of_hub("hub-a").items() if r.failure_message)
            await a.stop(failed[0])
            assert (await a.start("a-late", sid(), user_name="ann")).created
            assert (await b.poll("bob")).state == pb.SERVER_STATE_RUNNING


# --- expiry ------------------------------------------------------------------------------------


async def test_a_failed_start_expires_from_memory_and_database(tmp_path):
    db_url = f"sqlite:///{tmp_path}/outpost.sqlite"
    # long enough for the checks below to see the failed start before it expires, also on
    # a loaded machine (0.3 s was not)
    traits = {"failed_server_retention": 3.0, "exited_server_retention": 0, "poll_interval": 0.05}
    async with running_outpost(outpost_config(tmp_path, FloodSpawner, db_url=db_url, **traits)) as op:
        c = op.client
        r = await c.start("failed", sid(), user_name="fail-x", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_STOPPED and "no room" in r.status.failure_message
        await c.start("running", sid(), user_name="ron", wait_until_ready=True)
        await c.start("exited", sid(), user_name="exit-e", wait_until_ready=True)
        await wait_for(lambda: op.manager.records[("default", "exited")].state == pb.SERVER_STATE_STOPPED)
        assert ("default", "failed") in (await stored(op))[1]  # its events are stored

        async def gone():
            try:
                await c.poll("failed")
            except ServerNotFound:
                return True
            return False

        await wait_for(gone, timeout=30, message="the failed start never expired")
        assert held(op) == {"running", "exited"}  # exited servers are kept with retention 0
        rows, with_events = await stored(op)
        assert ("default", "failed") not in rows and ("default", "failed") not in with_events
        assert rows == {("default", "running"), ("default", "exited")}
    # a restart does not bring it back
    async with running_outpost(outpost_config(tmp_path, FloodSpawner, db_url=db_url, **traits)) as op:
        assert held(op) == {"running", "exited"}
        with pytest.raises(ServerNotFound):
            await op.client.poll("failed")


async def test_an_exited_server_expires_as_a_hubs_stop_of_it_would(start_outpost):
    traits = {"failed_server_retention": 0, "exited_server_retention": 0.3, "poll_interval": 0.05}
    async with start_outpost(FloodSpawner, **traits) as op:
        c = op.client
        await c.start("exited", sid(), user_name="exit-e", wait_until_ready=True)
        await c.start("failed", sid(), user_name="fail-f", wait_until_ready=True)
        await wait_for(lambda: ("default", "exited") not in op.manager.records, timeout=30)
        # as JupyterHub's User.stop(): a Spawner whose poll() says it exited (and that
        # kept no state) gets no stop() call; its failed sibling's clean-up stop() ran
        assert "exit-e" not in FloodSpawner.stopped and "fail-f" in FloodSpawner.stopped
        assert held(op) == {"failed"}  # failed starts kept with retention 0
        assert (await stored(op))[0] == {("default", "failed")}


async def test_retention_is_counted_from_the_stop_and_survives_a_restart(tmp_path):
    """Deterministic: expired() is asked about given times; the retention of a restored
    failed start counts from when it was stored, not from the restart."""
    db_url = f"sqlite:///{tmp_path}/outpost.sqlite"
    day = 86400.0
    config = outpost_config(tmp_path, FloodSpawner, db_url=db_url)  # the defaults: a day
    async with running_outpost(config) as op:
        await op.client.start("failed", sid(), user_name="fail-x", wait_until_ready=True)
        await op.client.start("running", sid(), user_name="ron", wait_until_ready=True)
        expiry = op.manager.expiry
        assert (expiry.failed_retention, expiry.exited_retention, expiry.interval) == (day, day, 60.0)
        now = time.time()
        assert expiry.expired(now + day - 60) == []
        assert [r.name for r in expiry.expired(now + day + 1)] == ["failed"]
    async with running_outpost(config) as op:
        expiry = op.manager.expiry
        assert expiry.expired(now + day - 60) == []
        assert [r.name for r in expiry.expired(now + day + 1)] == ["failed"]
        assert await expiry.sweep(now + day + 1) == 1
        assert held(op) == {"running"}
        assert (await stored(op))[0] == {("default", "running")}


async def test_a_sweep_never_removes_a_newer_start_of_the_same_name(start_outpost):
    async with start_outpost(FloodSpawner, failed_server_retention=0.01) as op:
        expiry = op.manager.expiry
        expiry.stop()  # this test sweeps by hand
        old = sid()
        await op.client.start("s", old, user_name="fail-x", wait_until_ready=True)
        due = expiry.expired(time.time() + 1)
        assert [r.start_id for r in due] == [old]
        new = sid()
        await op.client.start("s", new, user_name="sam", wait_until_ready=True)
        # the sweep's Stop carries the expired start's id: the new start is left alone
        assert (await op.manager.stop("default", "s", old))[0] == pb.STOP_OUTCOME_STALE_START_ID
        assert await expiry.sweep(time.time() + 1) == 0
        assert (await op.client.poll("s")).start_id == new
        assert (await stored(op))[0] == {("default", "s")}


async def test_retention_zero_keeps_stopped_servers_until_the_hub_stops_them(start_outpost):
    """The behaviour before the retention options: nothing expires, no sweep runs."""
    traits = {"failed_server_retention": 0, "exited_server_retention": 0, "poll_interval": 0.05}
    async with start_outpost(FloodSpawner, **traits) as op:
        expiry = op.manager.expiry
        assert not expiry.enabled and expiry._loop_task is None
        await op.client.start("failed", sid(), user_name="fail-f", wait_until_ready=True)
        await op.client.start("exited", sid(), user_name="exit-e", wait_until_ready=True)
        await wait_for(lambda: op.manager.records[("default", "exited")].state == pb.SERVER_STATE_STOPPED)
        assert expiry.expired(time.time() + 10 * 365 * 86400) == []
        assert await expiry.sweep(time.time() + 10 * 365 * 86400) == 0
        assert held(op) == {"failed", "exited"}
