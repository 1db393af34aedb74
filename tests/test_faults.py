"""Faults: the database goes away, Spawners are slow or hang, clients vanish, and a storm of
concurrent calls. Each test says what the Outpost promises when it happens.

Related, and not repeated here: tests/test_rpc.py (a client's deadline mid-Start, a
`break` mid-Events, the start timeout's status), tests/test_persistence.py (restarts),
tests/test_limits.py (a hub flooding Starts).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from outpost_client import DeadlineExceeded, OutpostClient, ServerNotFound, Unavailable, pb
from outpost_server.identity import hash_token
from outpost_server.store import async_url
from outpost_server.testing import HangingStartSpawner, RecordingSpawner, SlowPollSpawner

from .harness.hub import hub_client
from .harness.outpost import outpost_config, running_outpost
from .harness.procs import children_of, process_alive
from .harness.util import collect, free_port, sid, wait_for

pytestmark = pytest.mark.rpc

PG_BIN = Path("/usr/lib/postgresql/15/bin")


async def timed(call, bound: float, log: list[tuple[str, float]], what: str):
    """Await call within bound seconds; record (what, seconds) in log."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(call, bound)
    finally:
        log.append((what, time.perf_counter() - t0))


# --- a private PostgreSQL cluster -------------------------------------------------------------


async def run(*argv: str, user: str | None = "postgres") -> None:
    prefix = ("runuser", "-u", user, "--") if user else ()
    proc = await asyncio.create_subprocess_exec(
        *prefix, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise AssertionError(f"{argv[0]} exited with {proc.returncode}:\n{out.decode()[-2000:]}")


class PrivatePostgres:
    """A PostgreSQL cluster of this test alone (initdb in a temp dir, its own port), run as the
    postgres user; the machine's shared server on 5432 is never touched."""

    def __init__(self):
        # not under pytest's basetemp: its directories are 0700 root, closed to postgres
        self.dir = Path(tempfile.mkdtemp(prefix="outpost-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        shutil.chown(self.dir, "postgres", "postgres")
        self.running = False
        self.frozen: set[int] = set()

    async def init(self) -> None:
        await run(str(PG_BIN / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "-N")
        await self.start()

    async def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.dir} -c fsync=off"
        log = str(self.dir / "postgres.log")
        await run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        self.running = True

    async def stop_immediately(self) -> None:
        """Like a crash or a cut cable: no shutdown handshake with clients."""
        await run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.running = False

    def freeze(self) -> None:
        """SIGSTOP the postmaster and its backends: connections stay up, nothing answers
        (like a black-holed network or a hung host)."""
        master = int((self.data / "postmaster.pid").read_text().split()[0])
        self.frozen = {master, *children_of(master)}
        for pid in self.frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.frozen:
            os.kill(pid, signal.SIGCONT)
        self.frozen = set()

    async def close(self) -> None:
        self.thaw()
        try:
            if self.running:
                await self.stop_immediately()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def private_pg():
    if not (PG_BIN / "initdb").exists() or os.geteuid() != 0:
        pytest.skip(f"needs root and PostgreSQL 15 binaries in {PG_BIN}")
    pg = PrivatePostgres()
    try:
        await pg.init()
        yield pg
    finally:
        await pg.close()


# --- 1. the database goes away for 10 s -------------------------------------------------------


@pytest.mark.slow
async def test_postgres_outage(tmp_path, private_pg):
    """PostgreSQL unreachable for 10 s under a live Outpost (connections refused).

    During it: Poll, BatchPoll, ListServers, Events and an idempotent Start retry answer
    from memory; a new Start and a Stop answer UNAVAILABLE (PERSISTENCE_UNAVAILABLE) at
    once and leave nothing half done (the stopped server stays, STOPPING, until a Stop
    succeeds); a start in flight stays STARTING until its READY is stored; health stays
    SERVING. After it: Start and Stop succeed at the first try (the pool reconnects), and a
    restarted Outpost on the same database sees exactly what was acknowledged.
    """
    cfg = outpost_config(
        tmp_path,
        "outpost_server.testing.SlowSpawner",
        private_pg.url,
        poll_interval=0.3,
        allow_override=["delay"],
        **{"SlowSpawner.delay": 0.05, "SlowSpawner.steps": 1},
    )
    observed: dict[str, str] = {}
    async with running_outpost(cfg) as op:
        c = op.client
        ids = {name: sid() for name in ("run1", "run2", "run3")}
        for name, start_id in ids.items():
            r = await c.start(name, start_id, user_name=name, wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_RUNNING
        # a start that is still going when the database goes away
        slow_id = sid()
        await c.start("slow", slow_id, user_name="slow", config_overrides={"delay": 3.0})
        follower = asyncio.create_task(collect(c, "slow"))

        await private_pg.stop_immediately()
        outage_started = time.monotonic()
        latencies: list[tuple[str, float]] = []

        # reads are served from memory
        for name in ids:
            status = await timed(c.poll(name), 1, latencies, "Poll")
            assert status.state == pb.SERVER_STATE_RUNNING
        statuses, missing = await timed(c.batch_poll([*ids, "slow", "ghost"]), 1, latencies, "BatchPoll")
        assert [s.state for s in statuses] == [pb.SERVER_STATE_RUNNING] * 3 + [pb.SERVER_STATE_STARTING]
        assert missing == ["ghost"]
        listed = await timed(c.list_servers(), 1, latencies, "ListServers")
        assert sorted(s.server_name for s in listed) == ["run1", "run2", "run3", "slow"]
        events = await timed(collect(c, "run1"), 1, latencies, "Events")
        assert events[-1].kind == pb.EVENT_KIND_READY
        observed["Poll/BatchPoll/ListServers/Events"] = "OK (from memory)"
        # an idempotent retry of a running start needs no write either
        again = await timed(
            c.start("run2", ids["run2"], user_name="run2", wait_until_ready=True), 1, latencies, "Start (retry)"
        )
        assert not again.created and again.status.state == pb.SERVER_STATE_RUNNING

        # a new Start cannot be made durable: refused at once, nothing left behind
        with pytest.raises(Unavailable) as err:
            await timed(c.start("new1", sid(), user_name="new1"), 5, latencies, "Start")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "could not write to its database" in err.value.message
        observed["Start"] = f"{err.value.code.name} {err.value.reason}: {err.value.message}"
        with pytest.raises(ServerNotFound):
            await c.poll("new1")
        assert ("default", "new1") not in op.manager.records

        # a Stop cannot delete the row: refused, and the server is not forgotten
        with pytest.raises(Unavailable) as err:
            await timed(c.stop("run1", ids["run1"]), 5, latencies, "Stop")
        observed["Stop"] = f"{err.value.code.name} {err.value.reason}: {err.value.message}"
        assert err.value.reason == "PERSISTENCE_UNAVAILABLE" and "repeat Stop" in err.value.message
        after_stop = await c.poll("run1")
        observed["Poll after the failed Stop"] = pb.ServerState.Name(after_stop.state)
        assert after_stop.start_id == ids["run1"]

        # the start in flight cannot record READY: it stays STARTING (not failed), and a
        # Start that waits for it waits for the database, bounded by the caller's deadline
        await asyncio.sleep(3.5)  # its Spawner is done by now
        assert (await c.poll("slow")).state == pb.SERVER_STATE_STARTING
        with pytest.raises(DeadlineExceeded) as err:
            await c.start("slow", slow_id, user_name="slow", wait_until_ready=True, timeout=1)
        observed["Start(wait_until_ready) attached to a start in flight"] = (
            f"{err.value.code.name} after the caller's 1 s deadline"
        )
        async with grpc.aio.insecure_channel(op.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        observed["Health"] = "SERVING"

        # and it keeps answering for the whole outage
        while time.monotonic() - outage_started < 10:
            status = await timed(c.poll("run3"), 1, latencies, "Poll")
            assert status.state == pb.SERVER_STATE_RUNNING
            assert (await c.poll("slow")).state == pb.SERVER_STATE_STARTING
            await asyncio.sleep(0.5)
        await private_pg.start()
        outage = time.monotonic() - outage_started

        # recovery: the pool reconnects, the first calls succeed
        new_id = sid()
        r = await asyncio.wait_for(c.start("new1", new_id, user_name="new1", wait_until_ready=True), 10)
        assert r.created and r.status.state == pb.SERVER_STATE_RUNNING
        assert (await asyncio.wait_for(c.stop("run1", ids["run1"]), 10)).outcome == pb.STOP_OUTCOME_STOPPED
        assert (await c.stop("run2", ids["run2"])).outcome == pb.STOP_OUTCOME_STOPPED
        # the start that was in flight records READY once the database is back
        trail = await asyncio.wait_for(follower, 15)
        assert trail[-1].kind == pb.EVENT_KIND_READY
        assert [e.sequence for e in trail] == list(range(1, len(trail) + 1))
        assert (await c.poll("slow")).state == pb.SERVER_STATE_RUNNING

    # the writes are durable: a new Outpost on the same database
    async with running_outpost(cfg) as op:
        servers = await op.client.list_servers()
        assert [(s.server_name, s.start_id, s.state) for s in servers] == [
            ("new1", new_id, pb.SERVER_STATE_RUNNING),
            ("run3", ids["run3"], pb.SERVER_STATE_RUNNING),
            ("slow", slow_id, pb.SERVER_STATE_RUNNING),
        ]
        restored = [e async for e in op.client.events("slow")]
        assert restored[-1].kind == pb.EVENT_KIND_READY

    worst: dict[str, float] = {}
    for what, seconds in latencies:
        worst[what] = max(worst.get(what, 0), seconds)
    print(f"\noutage {outage:.1f}s; worst latency per call: "
          + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in worst.items()))
    for what, how in observed.items():
        print(f"  during the outage, {what}: {how}")


@pytest.mark.slow
async def test_a_frozen_database_fails_writes_in_bounded_time(tmp_path, private_pg):
    """PostgreSQL stops answering but its connections stay up (SIGSTOP: a hung host or a
    black-holed network, where nothing is refused): Starts and Stops answer UNAVAILABLE
    within a few Outpost.db_timeout, not at the caller's deadline, and all is well after."""
    cfg = outpost_config(tmp_path, "outpost_server.testing.InstantSpawner", private_pg.url, db_timeout=1.0)
    async with running_outpost(cfg) as op:
        c = op.client
        ids = {name: sid() for name in ("a", "b")}
        for name, start_id in ids.items():
            await c.start(name, start_id, user_name=name, wait_until_ready=True)
        private_pg.freeze()
        try:
            latencies: list[tuple[str, float]] = []
            results = await asyncio.gather(
                *(timed(c.start(f"new{i}", sid(), user_name="u", timeout=30), 30, latencies, "Start")
                  for i in range(5)),
                timed(c.stop("a", ids["a"], timeout=30), 30, latencies, "Stop"),
                return_exceptions=True,
            )
            assert all(isinstance(r, Unavailable) for r in results), results
            assert (await c.poll("b")).state == pb.SERVER_STATE_RUNNING
        finally:
            private_pg.thaw()
        worst = max(seconds for _, seconds in latencies)
        print(f"\nfrozen database, db_timeout 1 s: 5 Starts and a Stop answered UNAVAILABLE "
              f"in at most {worst:.1f} s")
        assert worst < 6  # without the bounds: until the deadline (30 s); one by one: 8 s
        r = await asyncio.wait_for(c.start("new0", sid(), user_name="u", wait_until_ready=True), 10)
        assert r.created and r.status.state == pb.SERVER_STATE_RUNNING
        assert (await c.stop("a", ids["a"])).outcome == pb.STOP_OUTCOME_STOPPED
        assert [s.server_name for s in await c.list_servers()] == ["b", "new0"]
        rows, _ = await op.app.store.load()
        assert sorted(row["server_name"] for row in rows) == ["b", "new0"]


@pytest.mark.slow
async def test_exit_seen_during_an_outage_is_persisted_after_it(tmp_path, private_pg):
    """A server that exits while the database is away: once it is back, the row says so.

    Nothing is shown before it is stored: during the outage the exit cannot be written,
    so the server stays RUNNING (the manager keeps polling it); after it, the next poll
    writes the exit and only then shows STOPPED.
    """
    cfg = outpost_config(tmp_path, "outpost_server.testing.SlowSpawner", private_pg.url,
                         poll_interval=0.1, **{"SlowSpawner.delay": 0})
    async with running_outpost(cfg) as op:
        await op.client.start("quits", sid(), user_name="quits", wait_until_ready=True)
        await private_pg.stop_immediately()
        op.manager.records[("default", "quits")].spawner.stopped = True  # the process exits
        await asyncio.sleep(1.0)  # ten polls see the exit; none can store it
        assert (await op.client.poll("quits")).state == pb.SERVER_STATE_RUNNING
        await private_pg.start()
        await wait_for(lambda: op.manager.records[("default", "quits")].state == pb.SERVER_STATE_STOPPED,
                       timeout=10, message="the exit is not shown after the database came back")  # fmt: skip
        status = await op.client.poll("quits")  # the caller is told
        assert (status.state, status.exit_code) == (pb.SERVER_STATE_STOPPED, 0)

        async def stored_state():
            rows, _ = await op.app.store.load()
            return rows[0]["state"] == "stopped" and rows[0]["exit_code"] == 0

        await wait_for(stored_state, timeout=5, interval=0.2,
                       message="the exit is still not in the database 5 s after it came back")


async def test_a_failed_write_never_makes_polls_of_one_spawner_overlap(start_outpost, monkeypatch):
    """One poll's write fails (the database refuses it) while another server's slow poll is
    in flight: the next rounds must not poll that Spawner a second time at once."""
    async with start_outpost(
        "outpost_server.testing.SlowPollSpawner", poll_interval=0.1, allow_override=["poll_delay"]
    ) as op:
        c = op.client
        await c.start("slow", sid(), user_name="slow", config_overrides={"poll_delay": 2.0}, wait_until_ready=True)
        await c.start("quick", sid(), user_name="quick", config_overrides={"poll_delay": 0.0}, wait_until_ready=True)
        await wait_for(lambda: SlowPollSpawner.polls_in_flight >= 1)

        async def refused(*ops):
            raise Unavailable("The Outpost could not write to its database; try again shortly.")

        monkeypatch.setattr(op.app.store, "write", refused)
        try:
            quick = op.manager.records[("default", "quick")]
            quick.spawner.exit_code = 3  # noticed at every round; every write fails
            done = SlowPollSpawner.polls_done
            await asyncio.sleep(1.0)  # "slow"'s poll of the first round is still in flight
            assert SlowPollSpawner.polls_done >= done + 5, "quick was not polled again"
            assert SlowPollSpawner.overlaps == 0, f"{SlowPollSpawner.overlaps} polls overlapped one still running"
            assert quick.state == pb.SERVER_STATE_RUNNING  # an exit not stored is not shown
        finally:
            monkeypatch.undo()
        await wait_for(lambda: quick.state == pb.SERVER_STATE_STOPPED, timeout=5)
        assert SlowPollSpawner.overlaps == 0


# --- several hubs (bearer tokens over loopback) -------------------------------------------------

TOKENS = {f"hub-{x}": f"faults-{x}-" + uuid.uuid4().hex for x in "abc"}
HUB_TOKENS = {hub: hash_token(token) for hub, token in TOKENS.items()}


# --- 2. slow polls ------------------------------------------------------------------------------


async def test_slow_polls_never_delay_other_calls(start_outpost):
    """Four servers whose poll() takes 5 s, polled by the Outpost's own loop: while those
    polls are in flight every other call, of this hub and another, answers at once."""
    n_slow, delay = 4, 5.0
    async with start_outpost(
        "outpost_server.testing.SlowPollSpawner",
        poll_interval=0.1,
        hub_tokens=HUB_TOKENS,
        **{"SlowPollSpawner.poll_delay": delay},
    ) as op:
        a = hub_client(op.address, token=TOKENS["hub-a"], timeout=20)
        b = hub_client(op.address, token=TOKENS["hub-b"], timeout=20)
        async with a, b:
            slow = {f"slow{i}": sid() for i in range(n_slow)}
            for name, start_id in slow.items():
                await a.start(name, start_id, user_name=name, wait_until_ready=True)
            await wait_for(lambda: SlowPollSpawner.polls_in_flight == n_slow, timeout=3)
            window = time.monotonic()
            calls: list[tuple[str, float, int, int]] = []  # what, seconds, polls in flight before/after

            async def call(what, coro):
                before = SlowPollSpawner.polls_in_flight
                t0 = time.perf_counter()
                result = await asyncio.wait_for(coro, 1.0)
                calls.append((what, time.perf_counter() - t0, before, SlowPollSpawner.polls_in_flight))
                return result

            # the slow servers themselves: answered from memory
            assert (await call("Poll slow", a.poll("slow0"))).state == pb.SERVER_STATE_RUNNING
            statuses, _ = await call("BatchPoll slow", a.batch_poll(list(slow)))
            assert len(statuses) == n_slow
            await call("ListServers", a.list_servers())
            # other servers of the same hub and of another hub, one after the other ...
            for client, name in ((a, "a-fast"), (b, "b-fast")):
                start_id = sid()
                r = await call("Start", client.start(name, start_id, user_name=name, wait_until_ready=True))
                assert r.status.state == pb.SERVER_STATE_RUNNING
                assert (await call("Poll", client.poll(name))).state == pb.SERVER_STATE_RUNNING
                await call("BatchPoll", client.batch_poll([name, "ghost"]))
                assert (await call("Stop", client.stop(name, start_id))).outcome == pb.STOP_OUTCOME_STOPPED
            # ... and all at once
            results = await asyncio.gather(
                *(call("Start", c.start(f"{h}-{i}", sid(), user_name="u", wait_until_ready=True))
                  for h, c in (("a", a), ("b", b)) for i in range(5)),
                *(call("Poll slow", a.poll(name)) for name in slow),
            )
            assert all(r.state == pb.SERVER_STATE_RUNNING for r in results[10:])
            await asyncio.gather(*(call("Stop", c.stop(f"{h}-{i}")) for h, c in (("a", a), ("b", b)) for i in range(5)))
            # even a Stop of a server whose own poll() is in flight
            assert (await call("Stop slow", a.stop("slow0", slow["slow0"]))).outcome == pb.STOP_OUTCOME_STOPPED
            elapsed = time.monotonic() - window

            assert elapsed < delay and SlowPollSpawner.polls_done == 0, "the slow polls ended before the calls"
            # the four slow polls were in flight throughout (servers started meanwhile may
            # add polls of their own: a round of polls never waits for a slow one)
            assert all(min(before, after) >= n_slow for _, _, before, after in calls), calls
            worst = max(seconds for _, seconds, _, _ in calls)
            print(f"\n{len(calls)} calls in {elapsed * 1e3:.0f} ms while {n_slow} polls of {delay:g} s were "
                  f"in flight; median {statistics.median(s for _, s, _, _ in calls) * 1e3:.1f} ms, "
                  f"worst {worst * 1e3:.1f} ms")
            assert worst < 1.0
            # the slow polls themselves complete, and say running
            await wait_for(lambda: SlowPollSpawner.polls_done >= n_slow, timeout=delay + 2)
            assert (await b.list_servers()) == []
            statuses, _ = await a.batch_poll(list(slow))
            assert [s.state for s in statuses] == [pb.SERVER_STATE_RUNNING] * (n_slow - 1)
            assert SlowPollSpawner.overlaps == 0


# --- 3. a start() that hangs ------------------------------------------------------------------


async def test_hanging_start_is_cut_off_and_cleaned_up(start_outpost):
    """c.Spawner.start_timeout (the Spawner's own trait) ends a start() that hangs: stop()
    runs, the child process it started is gone, and the stream ends with FAILED."""
    async with start_outpost("outpost_server.testing.HangingStartSpawner", **{"Spawner.start_timeout": 1}) as op:
        c = op.client
        start_id = sid()
        await c.start("hang", start_id, user_name="hang")
        follower = asyncio.create_task(collect(c, "hang"))
        pid = await wait_for(lambda: HangingStartSpawner.children.get("hang"), timeout=5)
        assert process_alive(pid)

        t0 = time.monotonic()
        r = await c.start("hang", start_id, user_name="hang", wait_until_ready=True, timeout=10)
        assert time.monotonic() - t0 < 3
        message = "The server did not start within 1 seconds."
        assert r.status.state == pb.SERVER_STATE_STOPPED and r.status.failure_message == message

        events = await asyncio.wait_for(follower, 5)
        assert events[-1].kind == pb.EVENT_KIND_FAILED
        assert events[-1].message == message and events[-1].error_class == "TimeoutError"
        assert HangingStartSpawner.stopped_users == ["hang"]
        assert not process_alive(pid), "the hung start's child process is still running"

        status = await c.poll("hang")
        assert status.state == pb.SERVER_STATE_STOPPED and status.failure_message == message
        rows, _ = await op.app.store.load()
        assert [(row["state"], row["failure_message"], row["spawner_state"]) for row in rows] == [
            ("stopped", message, None)
        ]


# --- 4. clients that go away ------------------------------------------------------------------


async def test_client_gone_mid_start_loses_nothing(start_outpost, caplog):
    """A waiting Start whose channel closes, and one whose caller cancels it: both starts
    go on to READY (test_rpc.py covers a caller's deadline)."""
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 1.0}) as op:
        ids = {"closed": sid(), "cancelled": sid()}
        clients = {name: OutpostClient(op.address) for name in ids}
        calls = {
            name: asyncio.create_task(clients[name].start(name, start_id, user_name=name, wait_until_ready=True))
            for name, start_id in ids.items()
        }
        await wait_for(lambda: all(("default", n) in op.manager.records for n in ids))
        await asyncio.sleep(0.2)
        assert {(await op.client.poll(n)).state for n in ids} == {pb.SERVER_STATE_STARTING}
        await clients["closed"].close()
        calls["cancelled"].cancel()
        outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
        # grpc.aio cancels the calls of a closed channel: both callers see CancelledError
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        await clients["cancelled"].close()

        for name, start_id in ids.items():
            events = await asyncio.wait_for(collect(op.client, name), 10)
            assert [e.kind for e in events].count(pb.EVENT_KIND_READY) == 1 and events[-1].kind == pb.EVENT_KIND_READY
            status = await op.client.poll(name)
            assert (status.state, status.start_id) == (pb.SERVER_STATE_RUNNING, start_id)
            assert not op.manager.records[("default", name)].spawner.stopped
        rows, _ = await op.app.store.load()
        assert sorted((row["server_name"], row["state"]) for row in rows) == [
            ("cancelled", "running"), ("closed", "running")
        ]
        assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("outpost")]


async def test_events_resume_exactly_after_disconnects(start_outpost):
    """A follower whose channel closes mid-stream, twice, resumes with after_sequence and
    gets exactly the rest: no duplicate, no gap, through to the terminal event."""
    async with start_outpost(
        "outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 1.6, "SlowSpawner.steps": 8}
    ) as op:
        await op.client.start("eve", sid(), user_name="eve")
        rec = op.manager.records[("default", "eve")]
        seen: list = []
        for k in (3, 2):
            gone = OutpostClient(op.address)
            stream = gone.events("eve", after_sequence=seen[-1].sequence if seen else 0)
            for _ in range(k):
                seen.append(await asyncio.wait_for(stream.__anext__(), 5))
            assert not rec.terminal, "the start ended before the disconnect"
            await gone.close()  # mid-stream: the call is still open
            await stream.aclose()
        seen += await collect(op.client, "eve", after_sequence=seen[-1].sequence)

        everything = await collect(op.client, "eve")
        assert [e.sequence for e in seen] == list(range(1, rec.last_sequence + 1))
        assert [(e.sequence, e.kind, e.message) for e in seen] == [
            (e.sequence, e.kind, e.message) for e in everything
        ]
        assert seen[-1].kind == pb.EVENT_KIND_READY
        assert sum(e.kind in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED) for e in seen) == 1


# --- 5. a storm of Starts and Stops -----------------------------------------------------------


def storm_plan(rng: random.Random, keys: list[tuple[str, str]], calls: int) -> dict[tuple[str, str], list[tuple]]:
    """Per server, a chain of operations run in order; the chains run concurrently.

    ``("start", copies, wait_until_ready)``: a Start with a new start_id, sent `copies`
    times at once (an idempotent retry racing the first); ``("stop", with_start_id)``.
    Starts and stops alternate; exactly `calls` Start and Stop calls in all.
    """
    plan: dict[tuple[str, str], list[tuple]] = {key: [] for key in keys}
    total = 0
    while total < calls:
        chain = plan[rng.choice(keys)]
        if chain and chain[-1][0] == "start":
            chain.append(("stop", rng.random() < 0.5))
            total += 1
        else:
            copies = 2 if calls - total >= 2 and rng.random() < 0.25 else 1
            chain.append(("start", copies, rng.random() < 0.5))
            total += copies
    return plan


async def test_storm_of_starts_and_stops_agrees_with_the_database(tmp_path, db_url):
    """200 concurrent Starts and Stops of three hubs, with Polls all along: no errors, no
    stalls, and afterwards the tables, ListServers and the Spawners tell the same story."""
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    from outpost_server.store import events as events_table
    from outpost_server.store import servers as servers_table

    rng = random.Random(20240605)
    hubs = sorted(TOKENS)
    keys = [(hub, f"s{i:02d}") for hub in hubs for i in range(20)]  # the same names in every hub
    plan = storm_plan(rng, keys, 200)
    cfg = outpost_config(
        tmp_path,
        "outpost_server.testing.RecordingSpawner",
        db_url,
        hub_tokens=HUB_TOKENS,
        **{"SlowSpawner.delay": 0.1, "SlowSpawner.steps": 2},
    )
    bound = 5.0
    latencies: list[tuple[str, float]] = []
    async with running_outpost(cfg) as op:
        clients = {hub: hub_client(op.address, token=TOKENS[hub], timeout=20) for hub in hubs}
        try:
            final: dict[tuple[str, str], str | None] = {}  # start_id of the running start, None: stopped

            in_flight = peak = 0

            async def call(coro, what):
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await timed(coro, bound, latencies, what)
                finally:
                    in_flight -= 1

            async def chain(key, ops):
                hub, name = key
                client, start_id = clients[hub], None
                for op_ in ops:
                    if op_[0] == "start":
                        _, copies, wait = op_
                        start_id = sid()
                        results = await asyncio.gather(*(
                            call(client.start(name, start_id, user_name=f"{hub}-{name}", wait_until_ready=wait), "Start")
                            for _ in range(copies)
                        ))
                        assert sum(r.created for r in results) == 1
                        assert all(r.status.start_id == start_id for r in results)
                        if wait:
                            assert all(r.status.state == pb.SERVER_STATE_RUNNING for r in results), results
                    else:
                        r = await call(client.stop(name, start_id if op_[1] else ""), "Stop")
                        assert r.outcome == pb.STOP_OUTCOME_STOPPED
                        start_id = None
                    await asyncio.sleep(0.01)
                final[key] = start_id

            storm_over = asyncio.Event()
            polls = 0

            async def poller(hub):
                nonlocal polls
                client, names = clients[hub], [name for h, name in keys if h == hub]
                while not storm_over.is_set():
                    statuses, not_found = await timed(client.batch_poll(names), bound, latencies, "BatchPoll")
                    assert len(statuses) + len(not_found) == len(names)
                    try:
                        await timed(client.poll(rng.choice(names)), bound, latencies, "Poll")
                    except ServerNotFound:
                        pass
                    await timed(client.list_servers(page_size=5), bound, latencies, "ListServers")
                    polls += 3
                    await asyncio.sleep(0.01)

            pollers = [asyncio.create_task(poller(hub)) for hub in hubs]
            t0 = time.monotonic()
            try:
                await asyncio.gather(*(chain(key, ops) for key, ops in plan.items() if ops))
            finally:
                storm_over.set()
                await asyncio.gather(*pollers)
            elapsed = time.monotonic() - t0
            for key in keys:
                final.setdefault(key, None)
            running = {key: start_id for key, start_id in final.items() if start_id}

            # the starts not waited for finish
            async def all_running():
                for hub in hubs:
                    names = [name for h, name in running if h == hub]
                    if names:
                        statuses, _ = await clients[hub].batch_poll(names)
                        if any(s.state != pb.SERVER_STATE_RUNNING for s in statuses):
                            return False
                return True

            await wait_for(all_running, timeout=10)

            # ListServers of each hub, and the manager's memory
            listed = {}
            for hub in hubs:
                for status in await clients[hub].list_servers():
                    assert status.state == pb.SERVER_STATE_RUNNING
                    listed[(hub, status.server_name)] = status.start_id
            assert listed == running
            assert set(op.manager.records) == set(running)

            # the tables, read directly
            engine = create_async_engine(async_url(db_url))
            try:
                async with engine.connect() as conn:
                    rows = (await conn.execute(select(servers_table))).mappings().all()
                    stored_events = (await conn.execute(select(events_table))).mappings().all()
            finally:
                await engine.dispose()
            assert {(r["hub"], r["server_name"]): r["start_id"] for r in rows} == running
            assert {r["state"] for r in rows} <= {"running"}
            by_server: dict[tuple[str, str], list] = {}
            for ev in stored_events:
                by_server.setdefault((ev["hub"], ev["server_name"]), []).append(ev)
            assert set(by_server) == set(running), "events of stopped servers were left behind"
            for key, evs in by_server.items():
                evs.sort(key=lambda ev: ev["sequence"])
                assert {ev["start_id"] for ev in evs} == {running[key]}
                assert [ev["sequence"] for ev in evs] == list(range(1, len(evs) + 1))
                assert evs[-1]["data"]["kind"] == pb.EVENT_KIND_READY

            # the Spawners: the current start's is running, every other one was stopped
            spawners: dict[str, list] = {}
            for spawner in RecordingSpawner.started:
                spawners.setdefault(spawner.user.name, []).append(spawner)
            for key in keys:
                mine = spawners.get(f"{key[0]}-{key[1]}", [])
                if key in running:
                    current = op.manager.records[key].spawner
                    assert mine[-1] is current and not current.stopped
                    assert await current.poll() is None
                    mine = mine[:-1]
                assert all(s.stopped for s in mine), f"{key}: a Spawner was left running"
        finally:
            for client in clients.values():
                await client.close()

    by_kind: dict[str, list[float]] = {}
    for what, seconds in latencies:
        by_kind.setdefault(what, []).append(seconds)
    print(
        f"\n{db_url.split(':')[0]}: 200 Starts/Stops (up to {peak} at once) and {polls} polls in {elapsed:.1f} s; "
        f"{len(running)} running; "
        + ", ".join(f"{k} max {max(v) * 1e3:.0f} ms (n={len(v)})" for k, v in by_kind.items())
    )
    assert sum(len(v) for k, v in by_kind.items() if k in ("Start", "Stop")) == 200
    assert peak >= 40, "the storm was not concurrent"
