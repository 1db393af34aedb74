"""End-to-end benchmark of one Outpost, measured through the real OutpostClient.

Starts ``jupyterhub-outpost`` as a subprocess (SQLite in a temp dir, the InstantSpawner so
that only the Outpost itself is measured), drives it over loopback gRPC and prints a table
of figures against their targets. Missing a target is not an error: the exit status is
non-zero only when the benchmark itself fails (the Outpost does not start, an RPC fails).

    .venv/bin/python benchmarks/bench.py [--n 100 [2000 ...]] [--events 250]
        [--cpu-seconds 60] [--method production|legacy|both] [--pin 0:1] [--json PATH]

``--method production`` (the default) measures the Outpost as a site runs it: mTLS (a CA,
server and hub certificates made by ``generate-certs``' code; the hub named by its client
certificate), INFO logging, and Starts carrying what JupyterHub sends (the 18 env keys of
its ``Spawner.get_env()``, user options). ``legacy`` is the method of the figures before
issue 15 (plaintext without credentials, warnings only, a Start with a user name alone);
``both`` runs each ``--n`` with each method (the legacy keys end in ``_legacy``) and shows
production / legacy. Every main run also times Starts with ``wait_until_ready``
(``start_wait_p50_ms``). ``--pin 0:1`` runs the Outposts on CPU 0 and this process and its
client processes on CPU 1.

Each size in ``--n`` gets a fresh Outpost. Keys of a run with n != 100 get a ``_n<N>``
suffix (e.g. ``start_p50_ms_n2000``), so runs of different sizes are kept in one results
file; with n=100 among the sizes, a second table shows each other size's figures as a
ratio to n=100 (target: within 1.5x).

Then, each in a fresh Outpost of its own (0 skips them):
- ``--events``: progress events of a Spawner inside the Outpost, stamped with the wall
  clock when yielded, timed to their arrival on the client's Events stream
  (``event_latency_p50_ms``);
- ``--cpu-seconds``: the Outpost's CPU (user+sys, percent of one core) with
  ``--cpu-servers`` (2,000) running servers, its own poll loop at the default
  ``Outpost.poll_interval``, and a hub-like client polling each server every 30 s through
  OutpostSpawner's shared ``BatchPoller`` (``cpu_2000_servers_pct``);
- ``--flavor-servers``: flavors (docs/flavors.md). An Outpost with 20 flavors next to one
  without: ``--flavor-starts`` (100) Starts through a flavor with limits alternating with
  as many plain Starts at the other Outpost (``start_flavor_p50_ms`` against
  ``start_noflavor_p50_ms``, target within 10 %); 200 concurrent Starts at a flavor with a
  total of 7 (``flavor_admit_200_total_s``; exactly 7 must be admitted, or the benchmark
  fails); ListFlavors with ``--flavor-servers`` (2,000) running servers over the 20
  flavors (``list_flavors_p50_ms``);
- ``--metrics-rounds``: an Outpost with ``c.Outpost.metrics_port`` (scraped every
  ``--metrics-scrape-interval`` seconds, default 15) next to one without: Starts, and 64 concurrent Polls in 1 s windows, at each in turn,
  ABBA (``metrics_start_slowdown``, ``metrics_poll_c64_slowdown``, target within 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import random
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

# Imported from the modules themselves rather than the package: an editable install made
# before outpost_client/__init__.py existed maps outpost_client as a namespace package.
from outpost_client.client import OutpostClient, ServerState, StopOutcome  # noqa: E402
from outpost_client.errors import FlavorLimitReached, ServerNotFound  # noqa: E402
from outpost_client.batch import BatchPoller  # noqa: E402
from outpost_client.v1 import outpost_pb2 as pb  # noqa: E402

from benchmarks.bench_spawners import stamp_of  # noqa: E402
from benchmarks.common import (  # noqa: E402
    METHODS,
    USER_OPTIONS,
    BenchOutpost,
    connect,
    hub_env,
    machine_info,
    parse_pin,
    pin_process,
    source_info,
    write_json,
)
from tests.harness.util import free_port, percentile  # noqa: E402

RUNNING = ServerState.Value("SERVER_STATE_RUNNING")
STOPPED = StopOutcome.Value("STOP_OUTCOME_STOPPED")

RPC_TIMEOUT = 10.0  # seconds; a call slower than this fails the benchmark
READY_TIMEOUT = 20.0  # seconds for the Outpost to answer after it was launched
WARMUP = 20  # start+stop pairs before measuring

POLL_C1_SECONDS = 2.0
POLL_C1_MAX_CALLS = 3000
POLL_CONCURRENT_SECONDS = 3.0
LIST_REPEATS = 50

BATCH_SIZE = 1000
BATCH_REPEATS = 50

# the event-latency run: starts one after the other, each with this many stamped events
EVENTS_PER_START = 25
EVENT_INTERVAL = 0.02  # seconds between two events of one start

# the CPU run: JupyterHub's default Spawner.poll_interval, and OutpostSpawner's default
# poll_batch_window (the shared poller's)
HUB_POLL_INTERVAL = 30.0
POLL_BATCH_WINDOW = 0.2
CPU_WARMUP = 15.0  # seconds of polling before the CPU clock starts

# the flavors run: 20 flavors; Starts through one with limits (and the same number at an
# Outpost without flavors, alternating); 200 concurrent Starts at a flavor with a total of 7;
# ListFlavors with --flavor-servers servers running
FLAVORS = 20
ADMIT_STARTS = 200
ADMIT_MAX = 7
ADMIT_ROUNDS = 3
LIST_FLAVORS_REPEATS = 50
FLAVOR_USERS = 200  # the running servers belong to this many users, spread evenly

# key: (comparison, target), for n=100. Only a subset of keys has a target.
TARGETS = {
    "poll_c64_rps": (">=", 2000),
    "poll_c1_p50_ms": ("<=", 0.8),
    "start_p50_ms": ("<=", 4),
    "stop_p50_ms": ("<=", 4),
    "start_c16_total_s": ("<=", 0.3),
    "list_p50_ms": ("<=", 5),
    "batch_status_1000_p50_ms": ("<=", 20),
}
# The absolute targets are the n=100 ones (issue 2); another size is held to its ratios
# to n=100 instead (issue 5), except for the BatchPoll of 1,000 servers, which has the same
# size at every n and its own absolute target (issue 5).
SIZE_INDEPENDENT = {"batch_status_1000_p50_ms"}
# figures of the runs that do not depend on --n (event latency, CPU)
EXTRA_TARGETS = {
    "event_latency_p50_ms": ("<=", 5),
    "cpu_2000_servers_pct": ("<", 5),
    # a start through a flavor (with limits) against one without, same moment, same load
    "start_flavor_slowdown": ("<=", 1.1),
    "flavor_admit_200_admitted": ("==", ADMIT_MAX),
    # metrics on against off (c.Outpost.metrics_port), same moment, same load
    "metrics_start_slowdown": ("<=", 1.05),
    "metrics_poll_c64_slowdown": ("<=", 1.05),
}

# Ratios of another size's figures to n=100's (target: within RATIO_TARGET).
RATIO_TARGET = 1.5
# figures where higher is better (the others: lower is better)
HIGHER_IS_BETTER = {"poll_c1_rps", "poll_c16_rps", "poll_c64_rps"}
# totals over all n servers: compared per server (divided by n)
PER_SERVER = {"start_c16_total_s", "stop_c16_total_s", "list_p50_ms"}
# the ratios held to RATIO_TARGET: medians, rates and per-server totals (tails -- p95,
# p99, max -- are shown, not checked: a single slow call moves them)
RATIO_CHECKED = {
    "start_p50_ms", "stop_p50_ms", "start_c16_total_s", "stop_c16_total_s", "list_p50_ms",
    "poll_c1_rps", "poll_c1_p50_ms", "poll_c16_rps", "poll_c16_p50_ms", "poll_c64_rps",
    "poll_c64_p50_ms", "rss_per_server_kib",
}  # fmt: skip
# batch_status_1000_p50_ms is shown, not held to the ratio: it asks for 1,000 servers at
# every n (its target is absolute, <= 20 ms), so its ratio says nothing about scale


def targets_for(n: int) -> dict:
    return {k: v for k, v in TARGETS.items() if n == 100 or k in SIZE_INDEPENDENT}


class BenchmarkError(Exception):
    """The benchmark could not run (as opposed to: a figure missed its target)."""


def run_client_processes(procs, ready, go, results, timeout: float) -> list:
    """Start the client processes, wait until each is connected and warm (notice one that
    died early), call go() to let them all start at once, and collect one result from
    each; the processes are always joined (killed after 10 s). BenchmarkError if one
    failed."""
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 30
        while not all(event.is_set() for event in ready):
            if any(not proc.is_alive() for proc in procs):
                raise BenchmarkError("a poll client process exited before it was ready")
            if time.monotonic() > deadline:
                raise BenchmarkError("a poll client process did not get ready within 30 s")
            time.sleep(0.05)
        go()
        collected = [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [r[1] for r in collected if r[0] != "ok"]
    if errors:
        raise BenchmarkError(f"poll client process failed: {errors[0]}")
    return collected


# --- small helpers ------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1e3


# --- one client: starts, stops, lists, sequential polls ---------------------------------


class Ids:
    """Unique start_ids for the whole run (a server name may be started several times)."""

    def __init__(self):
        self.counter = 0

    def next(self) -> str:
        self.counter += 1
        return f"bench-start-{self.counter:06d}"


def server_names(n: int, prefix: str = "bench") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(1, n + 1)]


class StartShape:
    """What a Start carries (``--method``). "production": what OutpostSpawner sends for a
    JupyterHub user -- the env of JupyterHub's own ``Spawner.get_env()``
    (``benchmarks.common.hub_env``: 18 keys with the API token, OAuth client and URLs,
    ~1 KB), ``USER_OPTIONS`` and the user's id; "legacy": the user name alone (the method
    before issue 15). A user's env is made once, outside the timed calls."""

    def __init__(self, method: str = "production"):
        self.method = method
        self._env: dict[str, dict[str, str]] = {}

    def kwargs(self, user: str) -> dict:
        if self.method == "legacy":
            return {"user_name": user}
        if user not in self._env:
            self._env[user] = hub_env(user)
        return {"user_name": user, "user_id": 1000, "env": self._env[user], "user_options": USER_OPTIONS}


START = StartShape()  # main() sets the method


async def timed_start(client: OutpostClient, name: str, start_id: str, *, wait: bool = False) -> float:
    """One Start (user "bench", ``START``'s shape); with ``wait``, wait_until_ready (the
    answer comes once the Spawner is ready). Returns its latency in seconds."""
    kwargs = START.kwargs("bench")
    t0 = time.perf_counter()
    response = await client.start(name, start_id, wait_until_ready=wait, **kwargs)
    elapsed = time.perf_counter() - t0
    if not response.created:
        raise BenchmarkError(f"Start of {name} attached to an existing start instead of creating one")
    return elapsed


async def timed_stop(client: OutpostClient, name: str) -> float:
    """One Stop; returns its latency in seconds."""
    t0 = time.perf_counter()
    response = await client.stop(name)
    elapsed = time.perf_counter() - t0
    if response.outcome != STOPPED:
        raise BenchmarkError(f"Stop of {name}: outcome {StopOutcome.Name(response.outcome)}")
    return elapsed


async def run_concurrently(jobs, concurrency: int) -> tuple[float, list[float]]:
    """Run coroutine factories with at most `concurrency` in flight.

    Returns the wall time of the whole batch and each job's result (a latency).
    """
    semaphore = asyncio.Semaphore(concurrency)

    async def one(job):
        async with semaphore:
            return await job()

    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(one(job) for job in jobs))
    return time.perf_counter() - t0, list(latencies)


async def wait_running(client: OutpostClient, names: list[str]) -> None:
    """Wait until every server reports RUNNING (the InstantSpawner needs one loop turn)."""
    deadline = time.monotonic() + 10
    pending = set(names)
    while pending and time.monotonic() < deadline:
        statuses = await client.list_servers()
        pending -= {s.server_name for s in statuses if s.state == RUNNING}
        if pending:
            await asyncio.sleep(0.05)
    if pending:
        raise BenchmarkError(f"{len(pending)} servers did not reach RUNNING, e.g. {min(pending)}")


async def poll_sequential(client: OutpostClient, names: list[str]) -> tuple[float, list[float]]:
    """Sequential Polls over names for POLL_C1_SECONDS or POLL_C1_MAX_CALLS calls."""
    latencies: list[float] = []
    t_start = time.perf_counter()
    deadline = t_start + POLL_C1_SECONDS
    i = 0
    while i < POLL_C1_MAX_CALLS and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        await client.poll(names[i % len(names)])
        latencies.append(time.perf_counter() - t0)
        i += 1
    return time.perf_counter() - t_start, latencies


# --- concurrent polls from several client processes -----------------------------------


async def _poll_worker_async(target, names, coroutines, offset, ready, go, duration):
    """One client process: `coroutines` callers polling in a loop until `duration` passed.
    target: the Outpost's ``connect_args()``."""
    async with connect(target, RPC_TIMEOUT) as client:
        # warm the channel (connection, HTTP/2 settings, stubs) before the clock starts
        for name in names[:10]:
            await client.poll(name)
        ready.set()
        # multiprocessing.Event.wait blocks; nothing else runs in this loop yet
        if not go.wait(30):
            raise BenchmarkError("never told to go")
        deadline = time.perf_counter() + duration
        latencies: list[float] = []

        async def caller(k: int) -> None:
            i = offset + k * 7  # spread the callers over the servers
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await client.poll(names[i % len(names)])
                latencies.append(time.perf_counter() - t0)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(coroutines)))
        return time.perf_counter() - t0, latencies


def _poll_worker(target, names, coroutines, offset, ready, go, duration, results):
    """Entry point of a client process (spawned, so no gRPC state is inherited)."""
    try:
        wall, latencies = asyncio.run(
            _poll_worker_async(target, names, coroutines, offset, ready, go, duration)
        )
        results.put(("ok", wall, latencies))
    except BaseException as e:
        ready.set()  # do not leave the parent waiting
        results.put(("error", repr(e), []))


def poll_multiprocess(target: tuple, names: list[str], processes: int, coroutines: int) -> dict:
    """Poll from `processes` client processes with `coroutines` callers each.

    The processes connect and warm up first; then all start on one signal, and the rate is
    the total number of calls over the longest process's measuring time.
    """
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(processes)]
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_poll_worker,
            args=(target, names, coroutines, p * 997, ready[p], go, POLL_CONCURRENT_SECONDS, results),
            daemon=True,
        )
        for p in range(processes)
    ]
    collected = run_client_processes(procs, ready, go.set, results, POLL_CONCURRENT_SECONDS + 30)
    wall = max(r[1] for r in collected)
    latencies = [lat for r in collected for lat in r[2]]
    return {
        "rps": len(latencies) / wall,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "calls": len(latencies),
    }


def best_poll_layout(target: tuple, names: list[str], concurrency: int) -> tuple[dict, str]:
    """Measure `concurrency` callers as 1 process and as 2 processes; keep the higher rate.

    With one Python client process the client's own CPU can be the limit; splitting the
    callers over two processes (each with its own event loop and channel) shows what the
    Outpost serves when the client is not the bottleneck. Both numbers are reported.
    """
    layouts = [(1, concurrency), (2, concurrency // 2)]
    measured = []
    for processes, coroutines in layouts:
        result = poll_multiprocess(target, names, processes, coroutines)
        result["layout"] = f"{processes} proc x {coroutines} coroutines"
        measured.append(result)
    best = max(measured, key=lambda r: r["rps"])
    summary = "; ".join(f"{r['layout']}: {r['rps']:.0f} rps" for r in measured)
    return best, summary


# --- the benchmark --------------------------------------------------------------------


async def run(outpost: BenchOutpost, n: int) -> dict:
    results: dict = {}
    notes: dict = {}
    ids = Ids()
    names = server_names(n)
    async with outpost.client(RPC_TIMEOUT) as client:
        await outpost.wait_serving(READY_TIMEOUT)
        if await client.list_servers():
            raise BenchmarkError("the fresh Outpost already has servers")

        # warm-up: imports, SQLAlchemy statement caches, the channel, the writer task
        warm = server_names(WARMUP, prefix="warmup")
        for name in warm:
            await timed_start(client, name, ids.next())
        await wait_running(client, warm)
        for name in warm:
            await timed_stop(client, name)
        # memory with no server (warm: imports, caches, the channel), for rss_per_server_kib
        rss_empty = outpost.rss_kib()

        # N sequential Starts, then N sequential Stops
        starts = [await timed_start(client, name, ids.next()) for name in names]
        results["start_p50_ms"] = ms(percentile(starts, 50))
        results["start_p95_ms"] = ms(percentile(starts, 95))
        await wait_running(client, names)
        stops = [await timed_stop(client, name) for name in names]
        results["stop_p50_ms"] = ms(percentile(stops, 50))
        results["stop_p95_ms"] = ms(percentile(stops, 95))
        notes["start, stop"] = f"1 proc x 1 coroutine, {n} calls each, one after the other"

        # N sequential Starts that wait for the Spawner (wait_until_ready): the answer
        # comes once the start is READY (its database write included), then N Stops
        waits = [await timed_start(client, name, ids.next(), wait=True) for name in names]
        results["start_wait_p50_ms"] = ms(percentile(waits, 50))
        results["start_wait_p95_ms"] = ms(percentile(waits, 95))
        notes["start_wait"] = (
            f"1 proc x 1 coroutine, {n} Starts with wait_until_ready one after the other "
            "(InstantSpawner: ready as soon as start() returns)"
        )
        for name in names:
            await timed_stop(client, name)

        # N Starts, 16 in flight
        wall, starts = await run_concurrently(
            [lambda name=name: timed_start(client, name, ids.next()) for name in names], 16
        )
        results["start_c16_total_s"] = wall
        results["start_c16_max_ms"] = ms(max(starts))
        notes["start_c16, stop_c16"] = f"1 proc, {n} calls, 16 in flight (asyncio.Semaphore)"
        await wait_running(client, names)
        # memory with N servers running (before the polls below grow the client buffers)
        rss_running = outpost.rss_kib()
        results["rss_empty_kib"] = rss_empty
        results["rss_running_kib"] = rss_running
        results["rss_per_server_kib"] = (rss_running - rss_empty) / n
        notes["rss_per_server"] = (
            f"(RSS with {n} servers running, after start_c16 - RSS with none, after the "
            f"warm-up) / {n}"
        )

        # ListServers with the N servers present
        lists = []
        for _ in range(LIST_REPEATS):
            t0 = time.perf_counter()
            listed = await client.list_servers()
            lists.append(time.perf_counter() - t0)
            if len(listed) != n:
                raise BenchmarkError(f"ListServers returned {len(listed)} servers, expected {n}")
        results["list_p50_ms"] = ms(percentile(lists, 50))
        notes["list"] = f"1 proc x 1 coroutine, {LIST_REPEATS} ListServers of {n} servers"

        # sequential Polls, in this process over the same channel
        wall, polls = await poll_sequential(client, names)
        results["poll_c1_rps"] = len(polls) / wall
        results["poll_c1_p50_ms"] = ms(percentile(polls, 50))
        results["poll_c1_p99_ms"] = ms(percentile(polls, 99))
        notes["poll_c1"] = f"1 proc x 1 coroutine, {len(polls)} calls"

        # concurrent Polls from separate client processes (blocking here is fine: the
        # Outpost is another process, and this loop has nothing else to do meanwhile)
        for concurrency in (16, 64):
            best, summary = best_poll_layout(outpost.connect_args(), names, concurrency)
            results[f"poll_c{concurrency}_rps"] = best["rps"]
            results[f"poll_c{concurrency}_p50_ms"] = best["p50_ms"]
            results[f"poll_c{concurrency}_p99_ms"] = best["p99_ms"]
            notes[f"poll_c{concurrency}"] = f"best of [{summary}]"

        # memory with N servers running, after all of the above (the polls included)
        results["rss_kib"] = outpost.rss_kib()

        # stop all N, 16 in flight
        wall, stops = await run_concurrently(
            [lambda name=name: timed_stop(client, name) for name in names], 16
        )
        results["stop_c16_total_s"] = wall
        results["stop_c16_max_ms"] = ms(max(stops))
        results["stop_c16_any_over_1s"] = max(stops) > 1.0

        if await client.list_servers():
            raise BenchmarkError("servers left after stopping them all")

        # BatchPoll: the status of 1,000 servers in one call (what a hub's shared poller sends)
        batch_names = server_names(BATCH_SIZE, prefix="batch")
        await run_concurrently(
            [lambda name=name: timed_start(client, name, ids.next()) for name in batch_names], 16
        )
        await wait_running(client, batch_names)
        batches = []
        for _ in range(BATCH_REPEATS):
            t0 = time.perf_counter()
            statuses, missing = await client.batch_poll(batch_names)
            batches.append(time.perf_counter() - t0)
            if len(statuses) != BATCH_SIZE or missing:
                raise BenchmarkError(f"BatchPoll answered {len(statuses)} statuses, {len(missing)} not found")
        results["batch_status_1000_p50_ms"] = ms(percentile(batches, 50))
        notes["batch_status_1000"] = f"1 proc x 1 coroutine, {BATCH_REPEATS} BatchPolls of {BATCH_SIZE} servers"
        await run_concurrently([lambda name=name: timed_stop(client, name) for name in batch_names], 16)
        try:
            await client.poll(names[0])
            raise BenchmarkError(f"{names[0]} still answers Poll after Stop")
        except ServerNotFound:
            pass
    results["_notes"] = notes
    return results


# --- event latency: a Spawner's progress event to the client's Events stream --------------


async def run_event_latency(outpost: BenchOutpost, events: int) -> dict:
    """Starts one after the other with benchmarks.bench_spawners.StampedProgressSpawner.

    Each event carries the wall clock (time.time()) of the moment the Spawner yielded it;
    this process subtracts it from the wall clock at the event's arrival on the Events
    stream (one machine, one clock). The client attaches to Events before the first event
    is yielded (the Spawner waits first_delay), so no event is a replay.
    """
    starts = max(1, math.ceil(events / EVENTS_PER_START))
    ids = Ids()
    latencies: list[float] = []
    async with outpost.client(RPC_TIMEOUT) as client:
        await outpost.wait_serving(READY_TIMEOUT)
        for name in server_names(starts, prefix="events"):
            await client.start(name, ids.next(), wait_until_ready=False, **START.kwargs("bench"))
            terminal = None
            async for event in client.events(name, timeout=60):
                arrived = time.time()
                stamp = stamp_of(event.message)
                if stamp is not None:
                    latencies.append(arrived - stamp)
                if event.kind in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED):
                    terminal = event
            if terminal is None or terminal.kind != pb.EVENT_KIND_READY:
                raise BenchmarkError(f"{name} did not become ready: {terminal}")
            await timed_stop(client, name)
    if len(latencies) != starts * EVENTS_PER_START:
        raise BenchmarkError(f"{len(latencies)} stamped events arrived, expected {starts * EVENTS_PER_START}")
    return {
        "event_latency_p50_ms": ms(percentile(latencies, 50)),
        "event_latency_p95_ms": ms(percentile(latencies, 95)),
        "event_latency_max_ms": ms(max(latencies)),
        "event_latency_events": len(latencies),
        "_notes": {
            "event_latency": (
                f"{starts} starts one after the other, {EVENTS_PER_START} progress events each "
                f"{EVENT_INTERVAL * 1e3:g} ms apart; time.time() when the Spawner (in the Outpost) "
                "yields an event -> time.time() when it arrives on the client's Events stream"
            )
        },
    }


def event_latency_config() -> str:
    return (
        f"c.StampedProgressSpawner.events = {EVENTS_PER_START}\n"
        f"c.StampedProgressSpawner.interval = {EVENT_INTERVAL}\n"
    )


# --- CPU of many servers under a hub's normal polling ------------------------------------


async def run_cpu(outpost: BenchOutpost, servers: int, seconds: float) -> dict:
    """The Outpost's CPU with `servers` running servers, polled as a hub polls them.

    The Outpost runs its own poll loop at its default poll_interval. The hub side is
    OutpostSpawner's own BatchPoller: each server is polled every HUB_POLL_INTERVAL
    seconds (JupyterHub's default Spawner.poll_interval), the servers' phases spread
    uniformly over the interval (as JupyterHub's jittered timers end up), and every poll
    waits up to POLL_BATCH_WINDOW for others to join one BatchPoll.
    """
    ids = Ids()
    names = server_names(servers, prefix="cpu")
    async with outpost.client(RPC_TIMEOUT) as client:
        await outpost.wait_serving(READY_TIMEOUT)
        await run_concurrently(
            [lambda name=name: timed_start(client, name, ids.next()) for name in names], 16
        )
        await wait_running(client, names)

        poller = BatchPoller(client, POLL_BATCH_WINDOW)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        end = begin + CPU_WARMUP + seconds
        rng = random.Random(0)
        latencies: list[float] = []
        polls = {"measured": 0, "errors": 0, "not_running": 0}
        window = {"open": False}

        async def hub_timer(name: str, phase: float) -> None:
            due = begin + phase
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                if loop.time() >= end:
                    return
                t0 = time.perf_counter()
                try:
                    status = await poller.status(name)
                except Exception:
                    polls["errors"] += 1
                else:
                    if status.state != RUNNING:
                        polls["not_running"] += 1
                if window["open"]:
                    latencies.append(time.perf_counter() - t0)
                    polls["measured"] += 1
                due += HUB_POLL_INTERVAL

        timers = [
            asyncio.create_task(hub_timer(name, rng.uniform(0, HUB_POLL_INTERVAL))) for name in names
        ]
        await asyncio.sleep(CPU_WARMUP)
        window["open"] = True
        calls0, cpu0, wall0, own0 = poller.calls, outpost.cpu_seconds(), time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        calls1, cpu1, wall1, own1 = poller.calls, outpost.cpu_seconds(), time.monotonic(), time.process_time()
        window["open"] = False
        await asyncio.gather(*timers)
        if polls["errors"] or polls["not_running"]:
            raise BenchmarkError(
                f"{polls['errors']} polls failed, {polls['not_running']} answered a state other than RUNNING"
            )
        rss = outpost.rss_kib()
    wall = wall1 - wall0
    batches = calls1 - calls0
    return {
        f"cpu_{servers}_servers_pct": 100 * (cpu1 - cpu0) / wall,
        "cpu_client_pct": 100 * (own1 - own0) / wall,
        "cpu_batch_polls_per_s": batches / wall,
        "cpu_names_per_batch": polls["measured"] / batches if batches else 0.0,
        "cpu_hub_poll_p50_ms": ms(percentile(latencies, 50)),
        "cpu_rss_kib": rss,
        "_notes": {
            "cpu": (
                f"{servers} servers (InstantSpawner), the Outpost's own poll loop at its default "
                f"poll_interval; a hub-like client polls each server every {HUB_POLL_INTERVAL:g} s "
                f"(phases uniform over the interval) through OutpostSpawner's BatchPoller "
                f"(window {POLL_BATCH_WINDOW:g} s); Outpost CPU (user+sys, /proc/<pid>/stat) over "
                f"{seconds:g} s after {CPU_WARMUP:g} s of warm-up, in % of one core; "
                "cpu_hub_poll_p50_ms includes the batch window"
            )
        },
    }


# --- flavors: a start through a flavor, admission under contention, ListFlavors -------------


def flavors_config() -> str:
    """The flavored Outpost's config: FLAVORS flavors for every hub and user, each with all
    three limits and a runtime ("f00" is the one the Starts go through), and "scarce" with
    a total of ADMIT_MAX. The limits are high enough that only "scarce" is ever full."""
    return (
        "c.Outpost.max_concurrent_starts_per_hub = 0\n"
        "flavors = {\n"
        "    f'f{i:02d}': {\n"
        "        'display_name': f'Flavor {i}', 'description': 'a benchmark flavor',\n"
        "        'max_total': 5000, 'max_per_hub': 5000, 'max_per_user': 500,\n"
        "        'max_runtime': 8 * 3600, 'weight': i, 'default': i == 0,\n"
        f"    }} for i in range({FLAVORS - 1})\n"
        "}\n"
        f"flavors['scarce'] = {{'display_name': 'Scarce', 'max_total': {ADMIT_MAX}}}\n"
        "c.Outpost.flavors = flavors\n"
    )


def plain_config() -> str:
    """The Outpost without flavors the flavored one is compared with: the same otherwise."""
    return "c.Outpost.max_concurrent_starts_per_hub = 0\n"


async def start_flavor(client: OutpostClient, name: str, start_id: str, flavor: str, user: str) -> float:
    """One Start through flavor (``START``'s shape); returns its latency in seconds."""
    kwargs = START.kwargs(user)
    t0 = time.perf_counter()
    response = await client.start(name, start_id, flavor=flavor, wait_until_ready=False, **kwargs)
    elapsed = time.perf_counter() - t0
    if not response.created:
        raise BenchmarkError(f"Start of {name} attached to an existing start instead of creating one")
    return elapsed


async def admit_round(client: OutpostClient, ids: Ids, round_: int) -> tuple[float, list[str]]:
    """ADMIT_STARTS Starts at once at "scarce" (each its own server and user); returns the
    wall time until every one was answered, and the names admitted. Any answer but
    created or FLAVOR_LIMIT_REACHED (limit "total") fails the benchmark."""
    names = server_names(ADMIT_STARTS, prefix=f"admit{round_}")
    shapes = {name: START.kwargs(f"u-{name}") for name in names}  # made before the clock starts

    async def one(name: str):
        try:
            await client.start(name, ids.next(), flavor="scarce", **shapes[name])
        except FlavorLimitReached as e:
            if e.metadata.get("limit") != "total":
                raise BenchmarkError(f"{name}: refused for limit {e.metadata.get('limit')!r}, expected total") from e
            return None
        return name

    t0 = time.perf_counter()
    answers = await asyncio.gather(*(one(name) for name in names))
    wall = time.perf_counter() - t0
    return wall, [a for a in answers if a]


async def run_flavors(outpost: BenchOutpost, starts: int, servers: int) -> dict:
    """The flavors figures; outpost has flavors_config(). A second Outpost without flavors
    runs beside it for the whole run, so the two kinds of Start are measured alternately
    (ABBA) under the same load: the machine's noise hits both alike."""
    results: dict = {}
    notes: dict = {}
    ids = Ids()
    plain = BenchOutpost(config=plain_config(), method=outpost.method, cpus=outpost.cpus)
    try:
        plain.launch()
        async with (
            outpost.client(RPC_TIMEOUT) as client,
            plain.client(RPC_TIMEOUT) as plain_client,
        ):
            await outpost.wait_serving(READY_TIMEOUT)
            await plain.wait_serving(READY_TIMEOUT)
            listed = await client.list_flavors(user_name="bench")
            if len(listed.flavors) != FLAVORS:
                raise BenchmarkError(f"ListFlavors listed {len(listed.flavors)} flavors, expected {FLAVORS}")

            # warm-up of both, then the Starts: flavored and plain alternating, ABBA
            warm = server_names(WARMUP, prefix="warmup")
            for name in warm:
                await start_flavor(client, name, ids.next(), "f00", "bench")
                await timed_start(plain_client, name, ids.next())
            for c in (client, plain_client):
                await wait_running(c, warm)
                for name in warm:
                    await timed_stop(c, name)
            flavored: list[float] = []
            unflavored: list[float] = []
            for i, name in enumerate(server_names(starts)):
                # A B, then B A: neither kind always goes first (ABBA)
                if i % 2 == 0:
                    flavored.append(await start_flavor(client, name, ids.next(), "f00", "bench"))
                    unflavored.append(await timed_start(plain_client, name, ids.next()))
                else:
                    unflavored.append(await timed_start(plain_client, name, ids.next()))
                    flavored.append(await start_flavor(client, name, ids.next(), "f00", "bench"))
            results["start_flavor_p50_ms"] = ms(percentile(flavored, 50))
            results["start_flavor_p95_ms"] = ms(percentile(flavored, 95))
            results["start_noflavor_p50_ms"] = ms(percentile(unflavored, 50))
            results["start_flavor_slowdown"] = percentile(flavored, 50) / percentile(unflavored, 50)
            notes["start_flavor"] = (
                f"{starts} Starts through flavor f00 (max_total, max_per_hub, max_per_user and a "
                f"runtime; {FLAVORS} flavors configured) alternating ABBA with {starts} Starts at an "
                "Outpost without flavors, one after the other; slowdown = flavored p50 / plain p50"
            )
            names = server_names(starts)
            for c in (client, plain_client):
                await wait_running(c, names)
                for name in names:
                    await timed_stop(c, name)
    finally:
        plain.terminate()
        plain.cleanup()

    async with outpost.client(RPC_TIMEOUT) as client:
        # 200 Starts at once at a flavor with a total of 7, ADMIT_ROUNDS times
        walls = []
        for round_ in range(ADMIT_ROUNDS):
            wall, admitted = await admit_round(client, ids, round_)
            if len(admitted) != ADMIT_MAX:
                raise BenchmarkError(
                    f"{len(admitted)} of {ADMIT_STARTS} concurrent Starts were admitted at a flavor "
                    f"with max_total {ADMIT_MAX}"
                )
            stored = [s for s in await client.list_servers() if s.flavor == "scarce"]
            if len(stored) != ADMIT_MAX:
                raise BenchmarkError(f"ListServers shows {len(stored)} servers of the flavor, expected {ADMIT_MAX}")
            walls.append(wall)
            await wait_running(client, admitted)
            for name in admitted:
                await timed_stop(client, name)
        results["flavor_admit_200_total_s"] = percentile(walls, 50)
        results["flavor_admit_200_max_s"] = max(walls)
        results["flavor_admit_200_admitted"] = ADMIT_MAX  # checked every round above
        notes["flavor_admit_200"] = (
            f"{ADMIT_STARTS} Starts at once (asyncio.gather, one channel; each its own server and "
            f"user) at a flavor with max_total {ADMIT_MAX}: wall time until all were answered, "
            f"median of {ADMIT_ROUNDS} rounds (each round: exactly {ADMIT_MAX} admitted, the rest "
            "FLAVOR_LIMIT_REACHED, else the benchmark fails)"
        )

        # ListFlavors with `servers` running servers over the flavors and FLAVOR_USERS users
        running = server_names(servers, prefix="flav")
        flavor_names = [f"f{i:02d}" for i in range(FLAVORS - 1)]
        await run_concurrently(
            [
                lambda i=i, name=name: start_flavor(
                    client, name, ids.next(), flavor_names[i % len(flavor_names)], f"user-{i % FLAVOR_USERS:03d}"
                )
                for i, name in enumerate(running)
            ],
            16,
        )
        await wait_running(client, running)
        lists = []
        for _ in range(LIST_FLAVORS_REPEATS):
            t0 = time.perf_counter()
            listed = await client.list_flavors(user_name="user-007")
            lists.append(time.perf_counter() - t0)
        in_use = sum(f.in_use_total for f in listed.flavors)
        if in_use != servers:
            raise BenchmarkError(f"ListFlavors counts {in_use} servers in use, expected {servers}")
        results["list_flavors_p50_ms"] = ms(percentile(lists, 50))
        results["list_flavors_p95_ms"] = ms(percentile(lists, 95))
        notes["list_flavors"] = (
            f"{LIST_FLAVORS_REPEATS} ListFlavors for one user, {FLAVORS} flavors, {servers} running "
            f"servers of {FLAVOR_USERS} users spread over {FLAVORS - 1} of them"
        )
        await run_concurrently([lambda name=name: timed_stop(client, name) for name in running], 16)
    results["_notes"] = notes
    return results


# --- metrics: the cost of c.Outpost.metrics_port, on against off -------------------------

METRICS_SERVERS = 100  # running servers the Polls go to (and the scrapes count)
METRICS_STARTS = 100  # sequential Starts per Outpost and round
SCRAPE_INTERVAL = 15.0  # seconds between two scrapes (--metrics-scrape-interval): a usual Prometheus setting
POLL_WINDOW = 1.0  # seconds of Polls at one Outpost before switching to the other


def _scrape_loop(url: str, interval: float, stop, results) -> None:
    """A scraper process: GET url every interval until stop is set; its durations to results."""
    durations: list[float] = []
    try:
        while not stop.wait(interval):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as response:
                response.read()
            durations.append(time.perf_counter() - t0)
    finally:
        results.put(durations)


class Scraper:
    """A Prometheus stand-in: GET /metrics every ``interval`` seconds from a process of its own
    (not this one: its thread would take the GIL from the client it measures) while
    ``with`` lasts; the scrapes' durations are kept."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.durations: list[float] = []
        self._ctx = mp.get_context("spawn")

    def scrape(self) -> bytes:
        with urllib.request.urlopen(self.url, timeout=RPC_TIMEOUT) as response:
            return response.read()

    def __enter__(self):
        self._stop = self._ctx.Event()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_scrape_loop, args=(self.url, self.interval, self._stop, self._results), daemon=True
        )
        self._proc.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.durations += self._results.get(timeout=RPC_TIMEOUT + 10)
        self._proc.join(10)


async def _paired_poll_worker_async(targets, names, coroutines, offset, ready, go, windows, window):
    """One client process polling two Outposts in turn: window after window of `window`
    seconds, the side of window j given by ABBA (j % 4 in (0, 3): addresses[0]); answers
    the calls each window completed. Every process keeps the same clock (time.time()), so
    all of them switch sides together."""
    async with (
        connect(targets[0], RPC_TIMEOUT) as first,
        connect(targets[1], RPC_TIMEOUT) as second,
    ):
        for client in (first, second):
            for name in names[:10]:
                await client.poll(name)
        ready.set()
        while go.value == 0:
            await asyncio.sleep(0.01)
        start = go.value
        calls = [0] * windows

        async def caller(k: int) -> None:
            i = offset + k * 7
            while True:
                j = int((time.time() - start) // window)
                if j >= windows:
                    return
                if j < 0:
                    await asyncio.sleep(start - time.time())
                    continue
                client = first if j % 4 in (0, 3) else second
                await client.poll(names[i % len(names)])
                if int((time.time() - start) // window) == j:  # a call across a switch counts for neither
                    calls[j] += 1
                i += 1

        await asyncio.gather(*(caller(k) for k in range(coroutines)))
        return calls


def _paired_poll_worker(targets, names, coroutines, offset, ready, go, windows, window, results):
    try:
        calls = asyncio.run(
            _paired_poll_worker_async(targets, names, coroutines, offset, ready, go, windows, window)
        )
        results.put(("ok", calls))
    except BaseException as e:
        ready.set()
        results.put(("error", repr(e)))


def paired_polls(targets: list[tuple], names: list[str], windows: int, window: float) -> list[float]:
    """64 concurrent Polls (2 client processes x 32) at two Outposts in turn (ABBA windows);
    the rate of each window (calls / window seconds), first Outpost in windows j % 4 in (0, 3)."""
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(2)]
    go = ctx.Value("d", 0.0)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_paired_poll_worker,
            args=(targets, names, 32, p * 997, ready[p], go, windows, window, results),
            daemon=True,
        )
        for p in range(2)
    ]

    def go_in_a_moment():
        go.value = time.time() + 0.2

    collected = run_client_processes(procs, ready, go_in_a_moment, results, windows * window + 30)
    return [sum(r[1][j] for r in collected) / window for j in range(windows)]


async def run_metrics(outpost: BenchOutpost, rounds: int, metrics_port: int, scrape_interval: float) -> dict:
    """``outpost`` serves metrics on metrics_port; a second Outpost without them runs beside
    it, configured the same otherwise, and a separate process scrapes the first every
    scrape_interval seconds throughout. Both are measured in turn, ABBA, in small steps so that the
    machine's noise hits both alike: ``rounds`` x 100 sequential Starts alternating between
    them, then 64 concurrent Polls switching between them every POLL_WINDOW seconds
    (``rounds`` x 4 windows)."""
    results: dict = {}
    notes: dict = {}
    ids = Ids()
    plain = BenchOutpost(method=outpost.method, cpus=outpost.cpus)
    scraper = Scraper(metrics_port, scrape_interval)
    try:
        plain.launch()
        async with (
            outpost.client(RPC_TIMEOUT) as on_client,
            plain.client(RPC_TIMEOUT) as off_client,
        ):
            await outpost.wait_serving(READY_TIMEOUT)
            await plain.wait_serving(READY_TIMEOUT)
            polled = server_names(METRICS_SERVERS, prefix="polled")
            for c in (on_client, off_client):
                warm = server_names(WARMUP, prefix="warmup")
                for name in warm:
                    await timed_start(c, name, ids.next())
                await wait_running(c, warm)
                for name in warm:
                    await timed_stop(c, name)
                for name in polled:
                    await timed_start(c, name, ids.next())
                await wait_running(c, polled)
            if b"outpost_servers" not in scraper.scrape():
                raise BenchmarkError("the Outpost with metrics_port serves no outpost_servers gauge")
            with scraper:
                await asyncio.sleep(1.0)  # the scraper process is up
                starts: dict[str, list[float]] = {"on": [], "off": []}
                for round_ in range(rounds):
                    names = server_names(METRICS_STARTS, prefix=f"r{round_}")
                    for i, name in enumerate(names):
                        order = ("on", "off") if i % 2 == 0 else ("off", "on")  # ABBA
                        for side in order:
                            client = on_client if side == "on" else off_client
                            starts[side].append(await timed_start(client, name, ids.next()))
                    for c in (on_client, off_client):
                        await wait_running(c, names)
                        for name in names:
                            await timed_stop(c, name)
                # each Outpost as the first and as the second of the client's two channels:
                # which channel goes first alone moved the rate by up to 30 % on this
                # machine (two Outposts without metrics), so both orders are measured
                cpu_on, cpu_off = outpost.cpu_seconds(), plain.cpu_seconds()
                windows = paired_polls(
                    [outpost.connect_args(), plain.connect_args()], polled, rounds * 4, POLL_WINDOW
                )
                swapped = paired_polls(
                    [plain.connect_args(), outpost.connect_args()], polled, rounds * 4, POLL_WINDOW
                )
                cpu_on, cpu_off = outpost.cpu_seconds() - cpu_on, plain.cpu_seconds() - cpu_off
            for c in (on_client, off_client):
                for name in polled:
                    await timed_stop(c, name)
    finally:
        plain.terminate()
        plain.cleanup()
    first = [rate for j, rate in enumerate(windows) if j % 4 in (0, 3)]
    second = [rate for j, rate in enumerate(windows) if j % 4 in (1, 2)]
    first_swapped = [rate for j, rate in enumerate(swapped) if j % 4 in (0, 3)]
    second_swapped = [rate for j, rate in enumerate(swapped) if j % 4 in (1, 2)]
    rps_on, rps_off = first + second_swapped, second + first_swapped
    results["poll_c64_metrics_first_rps"] = sum(first) / len(first)
    results["poll_c64_nometrics_second_rps"] = sum(second) / len(second)
    results["poll_c64_nometrics_first_rps"] = sum(first_swapped) / len(first_swapped)
    results["poll_c64_metrics_second_rps"] = sum(second_swapped) / len(second_swapped)
    results["start_metrics_p50_ms"] = ms(percentile(starts["on"], 50))
    results["start_nometrics_p50_ms"] = ms(percentile(starts["off"], 50))
    results["metrics_start_slowdown"] = percentile(starts["on"], 50) / percentile(starts["off"], 50)
    results["poll_c64_metrics_rps"] = sum(rps_on) / len(rps_on)
    results["poll_c64_nometrics_rps"] = sum(rps_off) / len(rps_off)
    results["metrics_poll_c64_slowdown"] = sum(rps_off) / sum(rps_on)
    # the Outposts' CPU (user+sys, all threads) per Poll served: what the metrics cost the
    # Outpost itself, whatever else the machine runs (each is idle while the other is polled)
    results["poll_cpu_metrics_us"] = cpu_on / (sum(rps_on) * POLL_WINDOW) * 1e6
    results["poll_cpu_nometrics_us"] = cpu_off / (sum(rps_off) * POLL_WINDOW) * 1e6
    results["metrics_poll_cpu_slowdown"] = results["poll_cpu_metrics_us"] / results["poll_cpu_nometrics_us"]
    if scraper.durations:  # a short run (--metrics-rounds 1) may end before the first scrape
        results["scrape_p50_ms"] = ms(percentile(scraper.durations, 50))
    results["scrapes"] = len(scraper.durations)
    notes["metrics"] = (
        f"{rounds} x {METRICS_STARTS} sequential Starts at each Outpost, alternating ABBA; then "
        f"Polls of {METRICS_SERVERS} running servers from 2 client processes x 32 coroutines, "
        f"switching Outpost every {POLL_WINDOW:g} s ({rounds * 4} windows, ABBA), then again with "
        "the Outposts' places on the clients swapped (_first/_second: which place); the Outpost "
        f"with metrics scraped every {scrape_interval:g} s by a separate process throughout. "
        "slowdown = with / without for the Start p50 and the CPU per Poll, without / with for "
        "the Poll rate (above 1 is worse); CPU per Poll: each Outpost's user+sys time over "
        "both Poll phases / the Polls it answered (each Outpost also answers the scrapes, "
        "and its own poll loop, in that time)"
    )
    results["_notes"] = notes
    return results


# --- output -----------------------------------------------------------------------------


def fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def check(targets: dict, key: str, value) -> tuple[str, str]:
    """(target text, 'ok'/'miss'/'') of one figure."""
    if key not in targets:
        return "", ""
    op, target = targets[key]
    ok = {">=": value >= target, "<=": value <= target, "<": value < target, "==": value == target}[op]
    return f"{op} {target}", "ok" if ok else "miss"


def print_rows(title: str, rows: list[tuple[str, ...]]) -> None:
    """A table: the first row is the header; cells right-aligned in the numeric columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        # the numeric columns (between the key and the target, ok/miss) right-aligned
        cells = [
            c.rjust(w) if 0 < j < len(row) - 2 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(title: str, results: dict, notes: dict, targets: dict) -> list[str]:
    """Print one run's figures against targets; returns the keys that missed."""
    rows = [("key", "value", "target", "")]
    for key, value in results.items():
        rows.append((key, fmt(value), *check(targets, key, value)))
    print_rows(title, rows)
    print()
    for key, note in notes.items():
        print(f"{key}: {note}")
    return [k for k, v in results.items() if check(targets, k, v)[1] == "miss"]


def ratios(base: dict, other: dict, n: int) -> dict[str, dict]:
    """Each figure of the n-server run against the n=100 run.

    ``ratio`` is other/base (per server for the totals in PER_SERVER); ``slowdown`` is the
    ratio turned so that above 1 is worse (base/other for rates); ``checked`` says whether
    it is held to RATIO_TARGET.
    """
    out = {}
    for key, value in other.items():
        if key not in base or isinstance(value, bool):
            continue
        if key.startswith("rss_") and key != "rss_per_server_kib":
            continue  # absolute sizes: compared per server only
        a, b = base[key], value
        if key in PER_SERVER:
            a, b = a / 100, b / n
        if not a or not b:
            continue
        ratio = b / a
        slowdown = 1 / ratio if key in HIGHER_IS_BETTER else ratio
        out[key] = {"ratio": ratio, "slowdown": slowdown, "checked": key in RATIO_CHECKED}
    return out


def print_ratios(found: dict[str, dict], n: int) -> list[str]:
    rows = [("key", f"n={n}/n=100", "slowdown", "target", "")]
    misses = []
    for key, r in found.items():
        per = " (per server)" if key in PER_SERVER else ""
        if r["checked"]:
            ok = r["slowdown"] <= RATIO_TARGET
            verdict = ("ok" if ok else "miss", f"<= {RATIO_TARGET}")
            if not ok:
                misses.append(f"{key}_n{n}/n100")
        else:
            verdict = ("", "")
        rows.append((key + per, f"{r['ratio']:.2f}", f"{r['slowdown']:.2f}", verdict[1], verdict[0]))
    print_rows(f"n={n} against n=100 (slowdown: the ratio turned so that > 1 is worse)", rows)
    print("(tails -- p95, p99, max -- are shown, not checked)")
    return misses


METHOD_TITLES = {
    "production": (
        "InstantSpawner, SQLite, loopback mTLS with the hub's client certificate, INFO logging, "
        "Starts with JupyterHub's env (18 keys) and user options"
    ),
    "legacy": (
        "InstantSpawner, SQLite, loopback plaintext without credentials, warnings only, "
        "Starts with a user name alone"
    ),
}


def method_ratios(legacy: dict, production: dict) -> dict[str, float]:
    """production / legacy of each number both runs have (the cost of measuring as
    production runs)."""
    return {
        key: value / legacy[key]
        for key, value in production.items()
        if key in legacy and isinstance(value, (int, float)) and not isinstance(value, bool) and legacy[key]
    }


def print_method_ratios(found: dict[str, float], n: int) -> None:
    rows = [("key", "production/legacy", "", "")]
    rows += [(key, f"{r:.2f}", "", "") for key, r in found.items()]
    print_rows(f"n={n}: the production method against the legacy one (rates: above 1 is faster)", rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, nargs="+", default=[100], help="servers to start, one run per size (default 100)"
    )
    parser.add_argument(
        "--events",
        type=int,
        default=250,
        help="stamped progress events to time, in starts of 25 (default 250; 0 skips)",
    )
    parser.add_argument(
        "--cpu-seconds",
        type=float,
        default=60.0,
        help="seconds the Outpost's CPU is measured with --cpu-servers servers (default 60; 0 skips)",
    )
    parser.add_argument("--cpu-servers", type=int, default=2000, help="servers of the CPU run (default 2000)")
    parser.add_argument(
        "--flavor-servers",
        type=int,
        default=2000,
        help="running servers while ListFlavors is timed, in the flavors run (default 2000; 0 skips the run)",
    )
    parser.add_argument(
        "--flavor-starts", type=int, default=100, help="Starts with and without a flavor to compare (default 100)"
    )
    parser.add_argument(
        "--metrics-rounds",
        type=int,
        default=4,
        help="rounds of Starts and Polls at an Outpost with metrics and one without, alternately (default 4; 0 skips)",
    )
    parser.add_argument(
        "--metrics-scrape-interval",
        type=float,
        default=SCRAPE_INTERVAL,
        help=f"seconds between two scrapes of the Outpost with metrics (default {SCRAPE_INTERVAL:g})",
    )
    parser.add_argument(
        "--method",
        choices=[*METHODS, "both"],
        default="production",
        help="production (default): mTLS with the hub's client certificate, INFO logging, a Start "
        "with what JupyterHub sends (env, user options); legacy: plaintext without credentials, "
        "warnings only, a Start with a user name alone (the figures before issue 15); both: each "
        "--n once with each method (legacy keys end in _legacy), the other runs with production",
    )
    parser.add_argument(
        "--pin",
        metavar="OUTPOST_CPUS:CLIENT_CPUS",
        help="run the Outposts on some CPUs and this process and its client processes on others, "
        "e.g. 0:1 (sched_setaffinity; default: no pinning)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument(
        "--suffix",
        default=None,
        help='suffix of every figure key in the JSON (default: "" for n=100, else "_n<N>"; one --n only)',
    )
    args = parser.parse_args(argv)
    if min(args.n) < 1:
        parser.error("--n must be at least 1")
    if len(set(args.n)) != len(args.n):
        parser.error("each --n once")
    if args.suffix is not None and len(args.n) > 1:
        parser.error("--suffix takes one --n")
    if args.events < 0 or args.cpu_seconds < 0 or args.cpu_servers < 1:
        parser.error("--events and --cpu-seconds must not be negative, --cpu-servers at least 1")
    if args.flavor_servers < 0 or args.flavor_starts < 1:
        parser.error("--flavor-servers must not be negative, --flavor-starts at least 1")
    if args.metrics_rounds < 0:
        parser.error("--metrics-rounds must not be negative")
    outpost_cpus = None
    if args.pin:
        try:
            outpost_cpus, client_cpus = parse_pin(args.pin)
        except ValueError as e:
            parser.error(str(e))
        pin_process(os.getpid(), client_cpus)  # this process's threads; its children inherit it
    # the main runs' methods; the other runs use the first
    methods = ["legacy", "production"] if args.method == "both" else [args.method]
    extra_method = "production" if args.method == "both" else args.method

    def outpost_factory(method: str = extra_method, **kwargs):
        return lambda: BenchOutpost(method=method, cpus=outpost_cpus, **kwargs)

    def suffix_of(n: int) -> str:
        if args.suffix is not None:
            return args.suffix
        return "" if n == 100 else f"_n{n}"

    def main_label(n: int, method: str) -> str:
        return f"n={n}" if method == methods[-1] else f"n={n} {method}"

    # (label, method, Outpost factory, coroutine function) of every run, in order
    runs = [
        (main_label(n, method), method, outpost_factory(method), lambda outpost, n=n: run(outpost, n))
        for n in args.n
        for method in methods
    ]
    if args.events:
        runs.append((
            "events",
            extra_method,
            outpost_factory(
                spawner_class="benchmarks.bench_spawners.StampedProgressSpawner", config=event_latency_config()
            ),
            lambda outpost: run_event_latency(outpost, args.events),
        ))  # fmt: skip
    if args.cpu_seconds:
        runs.append((
            "cpu", extra_method, outpost_factory(),
            lambda outpost: run_cpu(outpost, args.cpu_servers, args.cpu_seconds),
        ))  # fmt: skip

    if args.flavor_servers:
        runs.append((
            "flavors",
            extra_method,
            outpost_factory(config=flavors_config()),
            lambda outpost: run_flavors(outpost, args.flavor_starts, args.flavor_servers),
        ))  # fmt: skip
    if args.metrics_rounds:
        metrics_port = free_port()
        runs.append((
            "metrics",
            extra_method,
            outpost_factory(config=f"c.Outpost.metrics_port = {metrics_port}\n"),
            lambda outpost: run_metrics(outpost, args.metrics_rounds, metrics_port, args.metrics_scrape_interval),
        ))  # fmt: skip

    source = source_info()  # before the runs: the code the Outposts below import
    t0 = time.monotonic()
    measured: dict[str, dict] = {}
    notes: dict[str, dict] = {}
    for label, method, make_outpost, coroutine in runs:
        START.method = method
        outpost = make_outpost()
        t_run = time.monotonic()
        try:
            outpost.launch()
            results = asyncio.run(coroutine(outpost))
        except Exception as e:
            print(f"benchmark failed ({label}): {type(e).__name__}: {e}", file=sys.stderr)
            if outpost.proc is not None:
                print(f"--- Outpost log (tail) ---\n{outpost.tail()}", file=sys.stderr)
            return 1
        finally:
            outpost.terminate()
            outpost.cleanup()
        notes[label] = results.pop("_notes")
        measured[label] = results
        print(f"{label}: {time.monotonic() - t_run:.1f}s", flush=True)

    document: dict = {}
    targets_doc: dict = {}
    misses: list[str] = []
    for n in args.n:
        for method in methods:
            label, suffix = main_label(n, method), suffix_of(n)
            if method != methods[-1]:  # --method both: the legacy run's keys
                suffix += f"_{method}"
            targets = targets_for(n)
            title = f"Outpost benchmark, n={n} ({METHOD_TITLES[method]})"
            misses += [k + suffix for k in print_table(title, measured[label], notes[label], targets)]
            if n != 100:
                print("(the absolute targets are for n=100; this size is held to its ratios to n=100)")
            document.update({f"{key}{suffix}": value for key, value in measured[label].items()})
            targets_doc.update({f"{k}{suffix}": f"{op} {t}" for k, (op, t) in targets.items()})
        if len(methods) > 1:
            found = method_ratios(measured[main_label(n, "legacy")], measured[main_label(n, "production")])
            print_method_ratios(found, n)
            document[f"method_ratios{suffix_of(n)}"] = {key: round(r, 4) for key, r in found.items()}
    if 100 in args.n and args.suffix is None:
        for n in args.n:
            if n == 100:
                continue
            found = ratios(measured["n=100"], measured[f"n={n}"], n)
            misses += print_ratios(found, n)
            document[f"ratios_n{n}"] = {key: round(r["ratio"], 4) for key, r in found.items()}
            targets_doc[f"ratios_n{n}"] = (
                f"slowdown <= {RATIO_TARGET} for {', '.join(sorted(k for k in found if found[k]['checked']))}"
            )
    for label, title in (
        ("events", "Event latency (StampedProgressSpawner in the Outpost -> client's Events stream)"),
        ("cpu", f"CPU of {args.cpu_servers} servers under a hub's polling"),
        ("flavors", f"Flavors ({FLAVORS} flavors; ListFlavors with {args.flavor_servers} servers running)"),
        ("metrics", f"Metrics on (c.Outpost.metrics_port, scraped every {args.metrics_scrape_interval:g} s) against off"),
    ):
        if label in measured:
            misses += print_table(title, measured[label], notes[label], EXTRA_TARGETS)
            document.update(measured[label])
    targets_doc.update(
        {k: f"{op} {t}" for k, (op, t) in EXTRA_TARGETS.items() if k in document}
    )
    print(f"\ntargets missed: {', '.join(misses) if misses else 'none'}")
    print(f"total run time {time.monotonic() - t0:.1f}s")

    if args.json:
        document.update(
            {
                "n": args.n,
                "machine": machine_info(),
                "source": source,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "method": notes,
                "measured_as": {
                    "method": args.method,
                    "main_runs": {m: METHOD_TITLES[m] for m in methods},
                    "other_runs": METHOD_TITLES[extra_method],
                    "pin": args.pin,
                },
                "targets": targets_doc,
                "targets_missed": misses,
            }
        )
        if len(args.n) == 1:
            document["suffix"] = suffix_of(args.n[0])
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
