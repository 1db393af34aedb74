"""Soak test: minutes of steady start/poll/stop against one Outpost hosting real processes.

One ``jupyterhub-outpost`` process (SQLite, JupyterHub's own ``LocalProcessSpawner``)
runs a long-lived ``sleep`` per server (its argv[0] is a marker unique to this run; run
as this user, or as root as the tests' notebook account: root is never a notebook's). The client keeps ``--servers`` servers alive and,
``--rate`` times a second, stops one of them and starts another (each start followed on
its Events stream to READY); meanwhile it polls continuously (``--poll-rate`` Polls a
second, a BatchPoll of every running server each second, a ListServers every 5 s), and
the Outpost polls its Spawners every ``--outpost-poll-interval`` seconds.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--json bench-results/soak.json]

After the last minute every server is stopped and the run checks, and fails (exit status
1) unless all hold:

- no RPC failed (a Poll that raced the Stop of its server is counted, not failed);
- the Outpost's RSS at the end (before the final stops, with --servers running) is within
  10 % of its RSS after the warm-up (``--warmup-minutes``, default 1);
- no process carrying the marker is left, and no zombie child of the Outpost;
- the database has no row in ``outpost_servers`` nor ``outpost_events`` (checked with the
  Outpost running, and again after it exited).

This process makes itself a child subreaper (this machine's PID 1 does not reap), so a
process the Outpost orphans becomes a child here: it is reaped and counted. Run from the
repository root; ``make soak`` runs it for 10 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import random
import signal
import sqlite3
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc is imported

from outpost_client.client import OutpostClient  # noqa: E402
from outpost_client.errors import ServerNotFound  # noqa: E402
from outpost_client.v1 import outpost_pb2 as pb  # noqa: E402

from benchmarks.common import BenchOutpost, machine_info, source_info, write_json  # noqa: E402
from tests.harness.procs import (  # noqa: E402
    children_of,
    open_fds,
    process_state,
    processes_with_argv,
    set_child_subreaper,
    threads_of,
)
from tests.harness.util import notebook_account  # noqa: E402
from tests.harness.util import percentile  # noqa: E402

RSS_TOLERANCE = 0.10
RPC_TIMEOUT = 30.0
SAMPLE_EVERY = 5.0  # seconds between two samples of the Outpost's RSS, fds and CPU
LIST_EVERY = 5.0
BATCH_EVERY = 1.0

OUTPOST_CONFIG = """
c.Outpost.spawner_class = "localprocess"
c.Outpost.poll_interval = {poll_interval!r}
c.Spawner.cmd = {cmd!r}
c.Spawner.ip = "127.0.0.1"
c.LocalProcessSpawner.interrupt_timeout = 5
"""


# --- processes ------------------------------------------------------------------------------


def children_with_state(parent: int) -> list[tuple[int, str]]:
    """(pid, state) of parent's children."""
    return [(pid, state) for pid in children_of(parent) if (state := process_state(pid)) is not None]


def reap_orphans(keep: set[int]) -> list[int]:
    """Reap this process's children that are not in keep (orphans the Outpost left behind:
    as a subreaper they become ours). Returns the pids of those that had exited."""
    reaped = []
    for pid in children_of(os.getpid()):
        if pid in keep:
            continue
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done:
            reaped.append(pid)
    return reaped


def count_rows(db_path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("outpost_servers", "outpost_events")
        }


# --- the workload ---------------------------------------------------------------------------


class Soak:
    def __init__(self, outpost: BenchOutpost, args, user_name: str):
        self.outpost = outpost
        self.args = args
        self.user_name = user_name
        self.pool = [f"soak-{i:03d}" for i in range(args.servers * 2)]
        self.running: set[str] = set()  # READY, not being stopped
        self.busy: set[str] = set()  # starting or stopping
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self.start_latencies: list[float] = []  # Start RPC -> READY on the Events stream
        self.stop_latencies: list[float] = []
        self.poll_latencies: list[float] = []
        self.samples: list[dict] = []
        self.tasks: set[asyncio.Task] = set()
        self.orphans_reaped: list[int] = []
        self.client: OutpostClient | None = None

    def error(self, what: str, e: BaseException | str) -> None:
        self.counts["rpc_errors"] += 1
        text = f"{what}: {type(e).__name__}: {e}" if isinstance(e, BaseException) else f"{what}: {e}"
        if len(self.errors) < 50:
            self.errors.append(text)
        print(f"ERROR {text}", file=sys.stderr, flush=True)

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # one start: Start, then the Events stream to READY
    async def start_one(self, name: str) -> None:
        self.busy.add(name)
        t0 = time.monotonic()
        try:
            start_id = uuid.uuid4().hex
            await self.client.start(name, start_id, user_name=self.user_name, wait_until_ready=False)
            last = None
            async for event in self.client.events(name, start_id=start_id, timeout=RPC_TIMEOUT):
                last = event
            if last is None or last.kind != pb.EVENT_KIND_READY:
                self.error(
                    f"start {name}",
                    f"ended with {last.kind if last else 'no event'}: {last and last.message}",
                )
                return
            self.start_latencies.append(time.monotonic() - t0)
            self.counts["starts"] += 1
            self.running.add(name)
        except Exception as e:
            self.error(f"start {name}", e)
        finally:
            self.busy.discard(name)

    async def stop_one(self, name: str) -> None:
        self.running.discard(name)
        self.busy.add(name)
        t0 = time.monotonic()
        try:
            response = await self.client.stop(name)
            if response.outcome != pb.STOP_OUTCOME_STOPPED:
                self.error(f"stop {name}", f"outcome {pb.StopOutcome.Name(response.outcome)}")
                return
            self.stop_latencies.append(time.monotonic() - t0)
            self.counts["stops"] += 1
        except Exception as e:
            self.error(f"stop {name}", e)
        finally:
            self.busy.discard(name)

    def check_status(self, what: str, name: str, status: pb.ServerStatus | None) -> None:
        """A polled server we believe running must be RUNNING (unless a Stop began since)."""
        ok = status is not None and status.state == pb.SERVER_STATE_RUNNING
        if ok:
            return
        if name not in self.running:
            self.counts["polls_raced_stop"] += 1
            return
        state = pb.ServerState.Name(status.state) if status is not None else "not found"
        self.error(f"{what} {name}", f"server believed running is {state}")

    async def poll_one(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            status = await self.client.poll(name)
        except ServerNotFound:
            status = None
        except Exception as e:
            self.error(f"poll {name}", e)
            return
        self.poll_latencies.append(time.perf_counter() - t0)
        self.counts["polls"] += 1
        self.check_status("poll", name, status)

    async def batch_poll(self) -> None:
        names = sorted(self.running)
        if not names:
            return
        try:
            statuses, _ = await self.client.batch_poll(names)
        except Exception as e:
            self.error("batch_poll", e)
            return
        self.counts["batch_polls"] += 1
        found = {s.server_name: s for s in statuses}
        for name in names:
            self.check_status("batch_poll", name, found.get(name))

    async def list_servers(self) -> None:
        try:
            listed = await self.client.list_servers()
        except Exception as e:
            self.error("list_servers", e)
            return
        self.counts["lists"] += 1
        self.counts["listed_max"] = max(self.counts["listed_max"], len(listed))

    def sample(self, t: float) -> dict:
        pid = self.outpost.proc.pid
        entry = {
            "t_s": round(t, 1),
            "rss_kib": self.outpost.rss_kib(),
            "fds": open_fds(pid),
            "threads": threads_of(pid),
            "cpu_s": round(self.outpost.cpu_seconds(), 2),
            "running": len(self.running),
            "children": len(children_of(pid)),
        }
        self.samples.append(entry)
        return entry

    # the loops: each keeps its own steady rate until `until` (loop time)
    async def every(self, period: float, until: float, action) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))
            if loop.time() >= until:
                return
            action()

    def churn(self) -> None:
        """Stop one running server and start another (more starts while below target)."""
        if len(self.running) >= self.args.servers - 2:
            self.spawn(self.stop_one(random.choice(sorted(self.running))))
        free = [n for n in self.pool if n not in self.running and n not in self.busy]
        alive = len(self.running) + len(self.busy)
        for _ in range(2 if alive < self.args.servers else 1):
            if free:
                self.spawn(self.start_one(free.pop(random.randrange(len(free)))))

    def poll_random(self) -> None:
        if self.running:
            self.spawn(self.poll_one(random.choice(sorted(self.running))))

    async def run(self) -> dict:
        args = self.args
        loop = asyncio.get_running_loop()
        async with OutpostClient(self.outpost.address, timeout=RPC_TIMEOUT) as client:
            self.client = client
            await self.outpost.wait_serving()
            await asyncio.gather(*(self.start_one(name) for name in self.pool[: args.servers]))
            if len(self.running) != args.servers:
                raise RuntimeError(f"only {len(self.running)} of {args.servers} servers started")
            print(f"{args.servers} servers running; soaking for {args.minutes:g} min", flush=True)

            t0 = loop.time()
            end = t0 + args.minutes * 60
            warm_at = t0 + args.warmup_minutes * 60
            keep = {self.outpost.proc.pid}

            def sample_and_reap() -> None:
                self.orphans_reaped += reap_orphans(keep)
                entry = self.sample(loop.time() - t0)
                if int(entry["t_s"]) % 60 < SAMPLE_EVERY:
                    print(f"  {entry}", flush=True)

            sample_and_reap()
            loops = [
                self.every(1 / args.rate, end, self.churn),
                self.every(1 / args.poll_rate, end, self.poll_random),
                self.every(BATCH_EVERY, end, lambda: self.spawn(self.batch_poll())),
                self.every(LIST_EVERY, end, lambda: self.spawn(self.list_servers())),
                self.every(SAMPLE_EVERY, end, sample_and_reap),
            ]
            warm_sample: dict = {}

            async def mark_warm() -> None:
                await asyncio.sleep(max(0.0, warm_at - loop.time()))
                warm_sample.update(self.sample(loop.time() - t0))
                warm_sample["counts"] = dict(self.counts)
                print(f"warm-up over: {warm_sample}", flush=True)

            await asyncio.gather(mark_warm(), *loops)
            # let in-flight starts and stops finish; the end sample has --servers running
            while self.tasks:
                await asyncio.wait(set(self.tasks), timeout=RPC_TIMEOUT * 2)
            for _ in range(args.servers):
                if len(self.running) >= args.servers:
                    break
                await self.start_one(next(n for n in self.pool if n not in self.running))
            end_sample = self.sample(loop.time() - t0)
            steady_wall = loop.time() - t0
            counts_end = dict(self.counts)

            # stop everything, then look for anything left behind
            await asyncio.gather(*(self.stop_one(name) for name in sorted(self.running)))
            listed = await client.list_servers()
            await asyncio.sleep(1.0)
            after_stop = {
                "listed": len(listed),
                "marked_processes": processes_with_argv(args.marker),
                "outpost_children": children_with_state(self.outpost.proc.pid),
                "db_rows": count_rows(self.outpost.db_path),
            }
            self.orphans_reaped += reap_orphans(keep)
        return {
            "warm": warm_sample,
            "end": end_sample,
            "steady_wall_s": steady_wall,
            "counts_end": counts_end,
            "after_stop": after_stop,
        }


# --- the run ------------------------------------------------------------------------------------


def evaluate(found: dict, soak: Soak, after_exit: dict, args) -> tuple[dict, dict]:
    """(figures, checks) of a finished run; checks map a name to (ok, detail)."""
    warm, end = found["warm"], found["end"]
    # CPU of the Outpost between the warm-up sample and the end sample
    wall = end["t_s"] - warm["t_s"]
    figures = {
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "servers": args.servers,
        "rate_per_s": args.rate,
        "poll_rate_per_s": args.poll_rate,
        "outpost_poll_interval_s": args.outpost_poll_interval,
        "starts": soak.counts["starts"],
        "stops": soak.counts["stops"],
        "polls": soak.counts["polls"],
        "batch_polls": soak.counts["batch_polls"],
        "lists": soak.counts["lists"],
        "polls_raced_stop": soak.counts["polls_raced_stop"],
        "rpc_errors": soak.counts["rpc_errors"],
        "start_to_ready_p50_ms": 1e3 * percentile(soak.start_latencies, 50),
        "start_to_ready_p99_ms": 1e3 * percentile(soak.start_latencies, 99),
        "stop_p50_ms": 1e3 * percentile(soak.stop_latencies, 50),
        "stop_p99_ms": 1e3 * percentile(soak.stop_latencies, 99),
        "poll_p50_ms": 1e3 * percentile(soak.poll_latencies, 50),
        "poll_p99_ms": 1e3 * percentile(soak.poll_latencies, 99),
        "rss_warm_kib": warm["rss_kib"],
        "rss_end_kib": end["rss_kib"],
        "rss_change_pct": 100 * (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"],
        "rss_max_kib": max(s["rss_kib"] for s in soak.samples),
        "fds_warm": warm["fds"],
        "fds_end": end["fds"],
        "threads_warm": warm["threads"],
        "threads_end": end["threads"],
        "outpost_cpu_pct": 100 * (end["cpu_s"] - warm["cpu_s"]) / wall if wall > 0 else 0.0,
        "orphans_reaped": len(soak.orphans_reaped),
        "outpost_log_errors": after_exit["log_errors"],
    }
    after = found["after_stop"]
    zombies = [pid for pid, state in after["outpost_children"] if state == "Z"]
    checks = {
        "no_rpc_errors": (soak.counts["rpc_errors"] == 0, f"{soak.counts['rpc_errors']} RPC errors"),
        "rss_within_10pct": (
            abs(figures["rss_change_pct"]) <= 100 * RSS_TOLERANCE,
            f"RSS {warm['rss_kib']} KiB after warm-up -> {end['rss_kib']} KiB at the end "
            f"({figures['rss_change_pct']:+.1f} %)",
        ),
        "no_servers_listed": (after["listed"] == 0, f"{after['listed']} servers listed after all stops"),
        "no_leaked_process": (
            not after["marked_processes"] and not after_exit["marked_processes"],
            f"marked processes after all stops: {after['marked_processes']}, "
            f"after the Outpost exited: {after_exit['marked_processes']}",
        ),
        "no_zombie": (
            not zombies and not soak.orphans_reaped,
            f"zombie children of the Outpost: {zombies}; orphans reaped here: {soak.orphans_reaped}",
        ),
        "no_leaked_rows": (
            not any(after["db_rows"].values()) and not any(after_exit["db_rows"].values()),
            f"rows after all stops: {after['db_rows']}, after the Outpost exited: {after_exit['db_rows']}",
        ),
    }
    return figures, checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="length of the soak, warm-up included (10)"
    )
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="warm-up: RSS is compared to its end (1, or minutes/5)",
    )
    parser.add_argument("--servers", type=int, default=20, help="servers kept alive (20)")
    parser.add_argument("--rate", type=float, default=2.0, help="stop+start pairs per second (2)")
    parser.add_argument("--poll-rate", type=float, default=50.0, help="Polls per second (50)")
    parser.add_argument(
        "--outpost-poll-interval", type=float, default=5.0, help="the Outpost's Outpost.poll_interval (5)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the Outpost's work dir (log, database)")
    args = parser.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = min(1.0, args.minutes / 5)
    if (
        not 0 <= args.warmup_minutes < args.minutes
        or args.servers < 3
        or args.rate <= 0
        or args.poll_rate <= 0
    ):
        parser.error("need 0 <= --warmup-minutes < --minutes, --servers >= 3, positive rates")
    args.marker = f"outpost-soak-{uuid.uuid4().hex[:12]}"

    source = source_info()  # before the run: the code the Outpost imports
    set_child_subreaper()
    random.seed(0)
    # no Python: the notebook account may not reach this interpreter (e.g. under /root)
    cmd = ["/bin/bash", "-c", f"exec -a {args.marker} sleep 1000000000"]
    outpost = BenchOutpost(
        spawner_class="localprocess",
        config=OUTPOST_CONFIG.format(poll_interval=args.outpost_poll_interval, cmd=cmd),
    )
    # the notebooks' account: this user, or as root (never a notebook's account) the tests' own
    user = notebook_account() if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    soak = Soak(outpost, args, user)
    t0 = time.monotonic()
    try:
        outpost.launch()
        try:
            found = asyncio.run(soak.run())
        finally:
            outpost.terminate()
        log_text = outpost.log.read_text(errors="replace")
        after_exit = {
            "marked_processes": processes_with_argv(args.marker),
            "db_rows": count_rows(outpost.db_path),
            "log_errors": sum(1 for line in log_text.splitlines() if line.startswith("[E ")),
        }
        soak.orphans_reaped += reap_orphans(set())
    except Exception as e:
        print(f"soak failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"--- Outpost log (tail) ---\n{outpost.tail()}", file=sys.stderr)
        for pid in processes_with_argv(args.marker):  # do not leave the sleepers behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return 1
    finally:
        if args.keep:
            print(f"kept {outpost.workdir}")
        else:
            outpost.cleanup()

    figures, checks = evaluate(found, soak, after_exit, args)
    print(f"\nSoak: {args.minutes:g} min, LocalProcessSpawner, {args.servers} servers, SQLite")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(
            f"{key.ljust(width)}  {value:.3f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}"
        )
    print()
    for name, (ok, detail) in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
    for text in soak.errors[:10]:
        print(f"  error: {text}")
    passed = all(ok for ok, _ in checks.values())
    print(f"\nsoak {'passed' if passed else 'FAILED'} in {time.monotonic() - t0:.0f}s")
    if args.json:
        write_json(
            args.json,
            {
                **figures,
                "passed": passed,
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
                "errors": soak.errors,
                "samples": soak.samples,
                "machine": machine_info(),
                "source": source,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": "benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
            },
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
