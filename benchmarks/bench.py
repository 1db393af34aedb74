"""End-to-end benchmark of one Outpost, measured through the real OutpostClient.

Starts ``jupyterhub-outpost`` as a subprocess (SQLite in a temp dir, the InstantSpawner so
that only the Outpost itself is measured), drives it over loopback gRPC and prints a table
of figures against their targets. Missing a target is not an error: the exit status is
non-zero only when the benchmark itself fails (the Outpost does not start, an RPC fails).

    .venv/bin/python benchmarks/bench.py [--n 100] [--json PATH]

Keys of a run with n != 100 get a ``_n<N>`` suffix (e.g. ``start_p50_ms_n2000``), so runs
of different sizes can be kept in one results file.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import shutil
import signal
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Imported from the modules themselves rather than the package: an editable install made
# before outpost_client/__init__.py existed maps outpost_client as a namespace package.
from outpost_client.client import OutpostClient, ServerState, StopOutcome
from outpost_client.errors import ServerNotFound

from common import free_port, machine_info, write_json  # benchmarks/ is sys.path[0]

RUNNING = ServerState.Value("SERVER_STATE_RUNNING")
STOPPED = StopOutcome.Value("STOP_OUTCOME_STOPPED")

# Where the outpost console script lives: next to the Python running this file (the venv).
OUTPOST_BIN = Path(sys.executable).parent / "jupyterhub-outpost"

RPC_TIMEOUT = 10.0  # seconds; a call slower than this fails the benchmark
READY_TIMEOUT = 20.0  # seconds for the Outpost to answer after it was launched
WARMUP = 20  # start+stop pairs before measuring

POLL_C1_SECONDS = 2.0
POLL_C1_MAX_CALLS = 3000
POLL_CONCURRENT_SECONDS = 3.0
LIST_REPEATS = 50

# key: (comparison, target), for n=100. Only a subset of keys has a target.
BATCH_SIZE = 1000
BATCH_REPEATS = 50

TARGETS = {
    "poll_c64_rps": (">=", 2000),
    "poll_c1_p50_ms": ("<=", 0.8),
    "start_p50_ms": ("<=", 4),
    "stop_p50_ms": ("<=", 4),
    "start_c16_total_s": ("<=", 0.3),
    "list_p50_ms": ("<=", 5),
    "batch_status_1000_p50_ms": ("<=", 20),
}
# Targets that only make sense at n=100 (they grow with n); not checked for other n.
SIZE_DEPENDENT = {"start_c16_total_s", "list_p50_ms"}


def targets_for(n: int) -> dict:
    return {k: v for k, v in TARGETS.items() if n == 100 or k not in SIZE_DEPENDENT}


class BenchmarkError(Exception):
    """The benchmark could not run (as opposed to: a figure missed its target)."""


# --- small helpers ------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, by the nearest-rank method."""
    if not samples:
        raise BenchmarkError("no samples")
    ordered = sorted(samples)
    rank = math.ceil(q / 100 * len(ordered))  # 1-based
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def ms(seconds: float) -> float:
    return seconds * 1e3


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchmarkError(f"no VmRSS in /proc/{pid}/status")


# --- the Outpost under test -----------------------------------------------------------


class OutpostProcess:
    """One ``jupyterhub-outpost`` subprocess with its own temp dir and SQLite file."""

    def __init__(self):
        self.tmpdir = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self.tmpdir / "outpost.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        cmd = [
            str(OUTPOST_BIN),
            "--port", str(self.port),
            "--ip", "127.0.0.1",
            "--db-url", f"sqlite:///{self.tmpdir / 'bench.sqlite'}",
            "--spawner-class", "outpost_server.testing.InstantSpawner",
            # traitlets' Application.log_level knows "WARN", not "WARNING"
            "--log-level", "WARN",
        ]  # fmt: skip
        # a fresh database encryption key (the Outpost refuses to start without one)
        from cryptography.fernet import Fernet

        env = dict(os.environ, OUTPOST_CRYPT_KEY=Fernet.generate_key().decode())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.tmpdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    async def wait_serving(self, client: OutpostClient) -> None:
        """Retry a cheap RPC until the Outpost answers (or exits, or READY_TIMEOUT passes)."""
        deadline = time.monotonic() + READY_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"the Outpost exited with status {self.proc.returncode}")
            try:
                await client.list_servers(timeout=1.0)
                return
            except Exception as e:  # not listening yet: UNAVAILABLE, deadline exceeded
                last_error = e
                await asyncio.sleep(0.1)
        raise BenchmarkError(
            f"the Outpost did not answer within {READY_TIMEOUT:g}s (last error: {last_error!r})"
        )

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            print("the Outpost ignored SIGTERM for 15 s; killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


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


async def timed_start(client: OutpostClient, name: str, start_id: str) -> float:
    """One Start; returns its latency in seconds."""
    t0 = time.perf_counter()
    response = await client.start(name, start_id, user_name="bench", wait_until_ready=False)
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


async def _poll_worker_async(address, names, coroutines, offset, ready, go, duration):
    """One client process: `coroutines` callers polling in a loop until `duration` passed."""
    async with OutpostClient(address, timeout=RPC_TIMEOUT) as client:
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


def _poll_worker(address, names, coroutines, offset, ready, go, duration, results):
    """Entry point of a client process (spawned, so no gRPC state is inherited)."""
    try:
        wall, latencies = asyncio.run(
            _poll_worker_async(address, names, coroutines, offset, ready, go, duration)
        )
        results.put(("ok", wall, latencies))
    except BaseException as e:
        ready.set()  # do not leave the parent waiting
        results.put(("error", repr(e), []))


def poll_multiprocess(address: str, names: list[str], processes: int, coroutines: int) -> dict:
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
            args=(address, names, coroutines, p * 997, ready[p], go, POLL_CONCURRENT_SECONDS, results),
            daemon=True,
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        # wait for every process to be connected and warm; notice one that died early
        deadline = time.monotonic() + 30
        while not all(event.is_set() for event in ready):
            if any(not proc.is_alive() for proc in procs):
                raise BenchmarkError("a poll client process exited before it was ready")
            if time.monotonic() > deadline:
                raise BenchmarkError("a poll client process did not get ready within 30 s")
            time.sleep(0.05)
        go.set()
        collected = []
        for _ in procs:
            collected.append(results.get(timeout=POLL_CONCURRENT_SECONDS + 30))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [r[1] for r in collected if r[0] != "ok"]
    if errors:
        raise BenchmarkError(f"poll client process failed: {errors[0]}")
    wall = max(r[1] for r in collected)
    latencies = [lat for r in collected for lat in r[2]]
    return {
        "rps": len(latencies) / wall,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "calls": len(latencies),
    }


def best_poll_layout(address: str, names: list[str], concurrency: int) -> tuple[dict, str]:
    """Measure `concurrency` callers as 1 process and as 2 processes; keep the higher rate.

    With one Python client process the client's own CPU can be the limit; splitting the
    callers over two processes (each with its own event loop and channel) shows what the
    Outpost serves when the client is not the bottleneck. Both numbers are reported.
    """
    layouts = [(1, concurrency), (2, concurrency // 2)]
    measured = []
    for processes, coroutines in layouts:
        result = poll_multiprocess(address, names, processes, coroutines)
        result["layout"] = f"{processes} proc x {coroutines} coroutines"
        measured.append(result)
    best = max(measured, key=lambda r: r["rps"])
    summary = "; ".join(f"{r['layout']}: {r['rps']:.0f} rps" for r in measured)
    return best, summary


# --- the benchmark --------------------------------------------------------------------


async def run(outpost: OutpostProcess, n: int) -> dict:
    results: dict = {}
    notes: dict = {}
    ids = Ids()
    names = server_names(n)
    async with OutpostClient(outpost.address, timeout=RPC_TIMEOUT) as client:
        await outpost.wait_serving(client)
        if await client.list_servers():
            raise BenchmarkError("the fresh Outpost already has servers")

        # warm-up: imports, SQLAlchemy statement caches, the channel, the writer task
        warm = server_names(WARMUP, prefix="warmup")
        for name in warm:
            await timed_start(client, name, ids.next())
        await wait_running(client, warm)
        for name in warm:
            await timed_stop(client, name)

        # N sequential Starts, then N sequential Stops
        starts = [await timed_start(client, name, ids.next()) for name in names]
        results["start_p50_ms"] = ms(percentile(starts, 50))
        results["start_p95_ms"] = ms(percentile(starts, 95))
        await wait_running(client, names)
        stops = [await timed_stop(client, name) for name in names]
        results["stop_p50_ms"] = ms(percentile(stops, 50))
        results["stop_p95_ms"] = ms(percentile(stops, 95))
        notes["start, stop"] = f"1 proc x 1 coroutine, {n} calls each, one after the other"

        # N Starts, 16 in flight
        wall, starts = await run_concurrently(
            [lambda name=name: timed_start(client, name, ids.next()) for name in names], 16
        )
        results["start_c16_total_s"] = wall
        results["start_c16_max_ms"] = ms(max(starts))
        notes["start_c16, stop_c16"] = f"1 proc, {n} calls, 16 in flight (asyncio.Semaphore)"
        await wait_running(client, names)

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
            best, summary = best_poll_layout(outpost.address, names, concurrency)
            results[f"poll_c{concurrency}_rps"] = best["rps"]
            results[f"poll_c{concurrency}_p50_ms"] = best["p50_ms"]
            results[f"poll_c{concurrency}_p99_ms"] = best["p99_ms"]
            notes[f"poll_c{concurrency}"] = f"best of [{summary}]"

        # memory with N servers running, after all of the above
        results["rss_kib"] = rss_kib(outpost.proc.pid)

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
    ok = value >= target if op == ">=" else value <= target
    return f"{op} {target}", "ok" if ok else "miss"


def print_table(results: dict, notes: dict, n: int) -> None:
    targets = targets_for(n)
    rows = [("key", "value", "target", "")]
    for key, value in results.items():
        rows.append((key, fmt(value), *check(targets, key, value)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\nOutpost benchmark, n={n} (InstantSpawner, SQLite, loopback plaintext)")
    for i, row in enumerate(rows):
        # values right-aligned, everything else left-aligned
        cells = [c.rjust(w) if j == 1 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for key, note in notes.items():
        print(f"{key}: {note}")
    if n != 100:
        print(f"(targets of {', '.join(sorted(SIZE_DEPENDENT))} are for n=100: not checked)")
    misses = [k for k, v in results.items() if check(targets, k, v)[1] == "miss"]
    print(f"\ntargets missed: {', '.join(misses) if misses else 'none'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="servers to start (default 100)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument(
        "--suffix",
        default=None,
        help='suffix of every figure key in the JSON (default: "" for n=100, else "_n<N>")',
    )
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    suffix = args.suffix if args.suffix is not None else ("" if args.n == 100 else f"_n{args.n}")

    outpost = OutpostProcess()
    t0 = time.monotonic()
    try:
        outpost.launch()
        results = asyncio.run(run(outpost, args.n))
    except Exception as e:
        print(f"benchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        if outpost.proc is not None:
            print(f"--- Outpost log (tail) ---\n{outpost.log_tail()}", file=sys.stderr)
        return 1
    finally:
        outpost.terminate()
        outpost.cleanup()
    notes = results.pop("_notes")
    print_table(results, notes, args.n)
    print(f"total run time {time.monotonic() - t0:.1f}s")

    if args.json:
        targets = targets_for(args.n)
        document = {f"{key}{suffix}": value for key, value in results.items()}
        document.update(
            {
                "n": args.n,
                "suffix": suffix,
                "machine": machine_info(),
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "method": notes,
                "targets": {f"{k}{suffix}": f"{op} {t}" for k, (op, t) in targets.items()},
            }
        )
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
