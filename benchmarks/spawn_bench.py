"""Spawn-to-ready time: a real JupyterHub spawning through the Outpost vs directly.

Two JupyterHub 6 processes (with the real configurable-http-proxy), both on 127.0.0.1:

  direct   ``c.JupyterHub.spawner_class = "simple"`` (SimpleLocalProcessSpawner) running
           ``jupyterhub-singleuser --allow-root`` in the hub's own machine;
  outpost  ``OutpostSpawner`` against a ``jupyterhub-outpost`` process that runs the same
           command with SimpleLocalProcessSpawner, its embedded SSH forwarder and the hub
           API reverse forward (``tests.harness.site.Site``, as the end-to-end tests
           use it), configured by ``Site.hub_config()``.

For each hub: one warm-up spawn (not counted, reported as ``spawn_first_*``; for the
Outpost it includes the hub's first SSH connect), then N spawns of different users. The
spawns of the two hubs alternate (direct, outpost, direct, ...) so that drift of the
machine's load hits both alike; every spawn runs alone. A spawn is timed from just before
``POST /users/<u>/server`` to the ``ready`` event of the hub's progress stream; the
server is stopped (``DELETE``, until the hub forgets it) before the next spawn.

    .venv/bin/python benchmarks/spawn_bench.py [--n 5] [--json PATH] [--keep]

Run from the repository root. The target (outpost median / direct median <= 1.3) is shown
as ok/miss; the exit status is non-zero only when the benchmark itself fails. ``--keep``
keeps the work dir (hub and Outpost logs) for a look at where the time goes; the hub's
own "took N seconds to start" figures are parsed from its log and shown too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc is imported

from cryptography.fernet import Fernet  # noqa: E402

from benchmarks.common import HubPair, machine_info, versions, warm_notebook_imports, write_json  # noqa: E402
from tests.harness.hub import JupyterHubProcess  # noqa: E402
from tests.harness.util import percentile  # noqa: E402

#: issue 15: through the Outpost faster than in the hub itself, at the median and at p95
TARGET_RATIO = 0.85
TARGET_RATIO_P95 = 1.0
SPAWN_TIMEOUT = 90.0  # seconds for one spawn's progress stream

TOOK = re.compile(r"User (\S+) took ([0-9.]+) seconds to start")
# log timestamps for the breakdown of a spawn (hub, Outpost and notebook log one local clock)
STAMP = r"\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) "
ACCEPTED = re.compile(STAMP + r"JupyterHub log:\d+\] 202 POST /hub/api/users/([^/\s]+)/server ")
HUB_LAUNCH = re.compile(STAMP + r"JupyterHub spawner:\d+\] Spawning ")  # no user: the one before ACCEPTED
OUTPOST_LAUNCH = re.compile(STAMP + r"outpost\.manager\.[^.\s]+\.(\S+)\] Spawning ")
LISTENING = re.compile(STAMP + r"ServerApp\] https?://\S+/user/([^/\s]+)/lab")
READY = re.compile(STAMP + r"JupyterHub base:\d+\] User (\S+) took [0-9.]+ seconds to start")
PHASES = ("launch", "startup", "poll", "notify")
PHASE_HELP = """phases (medians, from the log timestamps of hub, Outpost and notebook):
  launch   POST sent -> the notebook command is launched (hub, Outpost Start RPC, Spawner)
  startup  launched -> the notebook logs its URL (listening; Python imports dominate)
  poll     listening -> the hub logs 'took N seconds' (wait_for_http_server, jittered
           exponential backoff; for the Outpost through the SSH tunnel)
  notify   -> the 'ready' event reaches this process on the progress stream"""


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def stamps(pattern: re.Pattern, text: str) -> dict[str, float]:
    return {m.group(2): log_time(m.group(1)) for m in pattern.finditer(text)}


class BenchmarkError(Exception):
    """The benchmark could not run (as opposed to: the ratio missed its target)."""


# --- one hub under test ------------------------------------------------------------------


class Config:
    """One hub configuration and what was measured with it."""

    def __init__(self, label: str, hub: JupyterHubProcess):
        self.label = label
        self.hub = hub
        self.first: float | None = None
        self.times: list[float] = []
        self.users: list[str] = []  # users with a server that may still run
        self.spawned: list[str] = []  # every user spawned, in order
        self.wall: dict[str, tuple[float, float]] = {}  # user -> (POST sent, ready seen), time.time()

    async def spawn_timed(self, user: str) -> float:
        hub = self.hub
        r = await hub.api("POST", f"/users/{user}")
        if r.status_code not in (201, 409):
            raise BenchmarkError(f"{self.label}: creating {user} answered {r.status_code}: {r.text}")
        self.users.append(user)
        self.spawned.append(user)
        wall0 = time.time()
        started = time.perf_counter()
        r = await hub.api("POST", f"/users/{user}/server", json={})
        if r.status_code not in (201, 202):
            raise BenchmarkError(f"{self.label}: POST server of {user} answered {r.status_code}: {r.text}")
        events = await hub.progress(user, timeout=SPAWN_TIMEOUT)
        elapsed = time.perf_counter() - started
        self.wall[user] = (wall0, wall0 + elapsed)
        if not events or not events[-1].get("ready"):
            raise BenchmarkError(f"{self.label}: spawn of {user} did not get ready: {events}\n{hub.tail()}")
        # the proxy route works (not timed): the notebook answers through the hub's URL
        r = await hub.get(f"/user/{user}/api/status")
        if r.status_code != 200:
            raise BenchmarkError(
                f"{self.label}: /user/{user}/api/status answered {r.status_code}\n{hub.tail()}"
            )
        await hub.stop_server(user)
        self.users.remove(user)
        return elapsed

    def took(self) -> dict[str, float]:
        """The hub's own "User X took N seconds to start" figures, by user."""
        return {m.group(1): float(m.group(2)) for m in TOOK.finditer(self.hub.tail(n=10**8))}

    def breakdown(self, launcher_log: Path, notebook_log: Path) -> dict[str, dict[str, float]]:
        """By user, the spawn's phases (see PHASE_HELP) from the logs."""
        hub_text = self.hub.tail(n=10**8)
        if launcher_log == self.hub.log:  # the hub's Spawner: its "Spawning" line names no user
            launched, last = {}, None
            for line in hub_text.splitlines():
                m = HUB_LAUNCH.match(line)
                if m:
                    last = log_time(m.group(1))
                m = ACCEPTED.match(line)
                if m and last is not None:
                    launched[m.group(2)] = last
        else:
            launched = stamps(OUTPOST_LAUNCH, launcher_log.read_text())
        listening = stamps(LISTENING, notebook_log.read_text())
        ready = stamps(READY, hub_text)
        out = {}
        for user, (sent, seen) in self.wall.items():
            if user in launched and user in listening and user in ready:
                points = (sent, launched[user], listening[user], ready[user], seen)
                out[user] = {name: b - a for name, a, b in zip(PHASES, points, points[1:])}
        return out

    def summary(self) -> dict:
        return {
            "p50": statistics.median(self.times),
            "p90": percentile(self.times, 90),
            "p95": percentile(self.times, 95),
            "max": max(self.times),
            "min": min(self.times),
        }


async def run(n: int, root: Path) -> dict:
    pair = HubPair(root)
    direct = Config("direct", pair.direct)
    outpost = Config("outpost", pair.outpost)
    configs = [direct, outpost]
    try:
        setup_s = await pair.start()
        print(f"hubs and Outpost up in {setup_s:.1f}s (work dir {root})", flush=True)
        await warm_notebook_imports()
        for cfg in configs:
            cfg.first = await cfg.spawn_timed(f"warm-{cfg.label}")
            print(f"  {cfg.label:8s} first spawn {cfg.first:6.2f}s", flush=True)
        for i in range(1, n + 1):
            for cfg in configs if i % 2 else configs[::-1]:  # ABBA: neither always goes first
                elapsed = await cfg.spawn_timed(f"u{i}-{cfg.label}")
                cfg.times.append(elapsed)
                print(f"  {cfg.label:8s} spawn {i:2d}    {elapsed:6.2f}s", flush=True)
        took = {cfg.label: cfg.took() for cfg in configs}
        phases = {
            "direct": direct.breakdown(direct.hub.log, direct.hub.log),
            "outpost": outpost.breakdown(pair.site.op.log, pair.site.op.log),
        }
    finally:
        problems = await pair.stop({cfg.label: cfg.users for cfg in configs})
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
    if any(p.startswith("left behind") for p in problems):
        raise BenchmarkError("notebooks were left behind (see above)")

    d, o = direct.summary(), outpost.summary()
    return {
        "direct": d,
        "outpost": o,
        "ratio": o["p50"] / d["p50"],
        "ratio_p95": o["p95"] / d["p95"],
        "took": took,
        "phases": phases,
        "times": {cfg.label: cfg.times for cfg in configs},
        "first": {cfg.label: cfg.first for cfg in configs},
        "spawned": {cfg.label: cfg.spawned for cfg in configs},
    }


def phase_medians(res: dict, label: str) -> dict[str, float] | None:
    measured = [res["phases"][label][u] for u in res["spawned"][label][1:] if u in res["phases"][label]]
    if not measured:
        return None
    return {name: statistics.median(m[name] for m in measured) for name in PHASES}


def print_table(res: dict, n: int) -> None:
    print()
    print(f"spawn-to-ready (POST server -> progress 'ready'), n={n} per config, seconds")
    head = " ".join(f"{p:>7s}" for p in PHASES)
    print(f"{'config':8s} {'first':>6s} {'median':>6s} {'p90':>6s} {'p95':>6s} {'max':>6s} {'min':>6s} | {head}")
    for label in ("direct", "outpost"):
        s = res[label]
        ph = phase_medians(res, label)
        ph_s = " ".join(f"{ph[p]:7.3f}" for p in PHASES) if ph else "(no breakdown: log lines not found)"
        print(
            f"{label:8s} {res['first'][label]:6.2f} {s['p50']:6.2f} {s['p90']:6.2f} {s['p95']:6.2f} {s['max']:6.2f} "
            f"{s['min']:6.2f} | {ph_s}"
        )
    print(PHASE_HELP)
    ok = "ok" if res["ratio"] <= TARGET_RATIO else "MISS"
    print(f"ratio outpost/direct median: {res['ratio']:.2f}  (target <= {TARGET_RATIO})  {ok}")
    ok = "ok" if res["ratio_p95"] <= TARGET_RATIO_P95 else "MISS"
    print(f"ratio outpost/direct p95:    {res['ratio_p95']:.2f}  (target <= {TARGET_RATIO_P95})  {ok}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5, help="measured spawns per config (after one warm-up)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")

    # the Outpost's database encryption key: a fresh one for the run
    os.environ["OUTPOST_CRYPT_KEY"] = Fernet.generate_key().decode()
    root = Path(tempfile.mkdtemp(prefix="spawn-bench-"))
    started = time.perf_counter()
    try:
        res = asyncio.run(run(args.n, root))
    except (BenchmarkError, AssertionError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        print(f"logs kept in {root}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; logs kept in {root}", file=sys.stderr)
        return 130
    total = time.perf_counter() - started
    print_table(res, args.n)
    print(f"total {total:.0f}s")

    if args.json:
        out = {
            "spawn_direct_p50_s": round(res["direct"]["p50"], 3),
            "spawn_direct_p90_s": round(res["direct"]["p90"], 3),
            "spawn_direct_p95_s": round(res["direct"]["p95"], 3),
            "spawn_direct_max_s": round(res["direct"]["max"], 3),
            "spawn_outpost_p50_s": round(res["outpost"]["p50"], 3),
            "spawn_outpost_p90_s": round(res["outpost"]["p90"], 3),
            "spawn_outpost_p95_s": round(res["outpost"]["p95"], 3),
            "spawn_outpost_max_s": round(res["outpost"]["max"], 3),
            "spawn_ratio": round(res["ratio"], 3),
            "spawn_ratio_target": TARGET_RATIO,
            "spawn_ratio_p95": round(res["ratio_p95"], 3),
            "spawn_ratio_p95_target": TARGET_RATIO_P95,
            "spawn_first_direct_s": round(res["first"]["direct"], 3),
            "spawn_first_outpost_s": round(res["first"]["outpost"], 3),
            "spawn_direct_s": [round(t, 3) for t in res["times"]["direct"]],
            "spawn_outpost_s": [round(t, 3) for t in res["times"]["outpost"]],
            "hub_took_direct_s": res["took"]["direct"],
            "hub_took_outpost_s": res["took"]["outpost"],
            # by user: the phases of each spawn (launch, startup, poll, notify; see PHASE_HELP)
            "phases_direct_s": {
                u: {k: round(v, 3) for k, v in ph.items()} for u, ph in res["phases"]["direct"].items()
            },
            "phases_outpost_s": {
                u: {k: round(v, 3) for k, v in ph.items()} for u, ph in res["phases"]["outpost"].items()
            },
            **{
                f"phase_{label}_{name}_p50_s": round(value, 3)
                for label in ("direct", "outpost")
                for name, value in (phase_medians(res, label) or {}).items()
            },
            "n": args.n,
            "total_s": round(total, 1),
            "machine": machine_info(**versions()),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(args.json, out, sort_keys=False)  # keys in the order above

    if args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
