"""A class logs in at once: N users spawning within one second, through the Outpost vs directly.

The two hubs of spawn_bench (``benchmarks.common.HubPair``), real JupyterHub 6 processes
with the real configurable-http-proxy on 127.0.0.1:

  direct   ``c.JupyterHub.spawner_class = "simple"`` (SimpleLocalProcessSpawner) running
           ``jupyterhub-singleuser --allow-root`` in the hub's own machine;
  outpost  ``OutpostSpawner`` -> ``jupyterhub-outpost`` (the same Spawner and command) ->
           the Outpost's embedded SSH forwarder (the hub's tunnel, and the hub API's
           reverse forward): ``tests.harness.site.Site``, as the end-to-end tests use it.

A burst: ``--users`` users (default 40, new names each burst) start within ``--window``
seconds (default 1; user i at i x window / N), each as a browser does: ``GET
/hub/login``, ``POST /hub/login`` (DummyAuthenticator; the hub creates the user and,
without an options form, spawns at once and sends the browser to the spawn-pending
page), then the page's progress event stream (cookie and _xsrf, as the page's
EventSource) until ``ready`` or ``failed``. Spawn-to-ready of a user: from just before
its login POST to its ``ready`` event. After the burst (not timed) every ready notebook
must answer ``/user/<name>/api/status`` through the proxy, else it counts as a failure;
then every server is stopped and the next burst waits until no notebook is left.

Per burst: the time until every user's stream ended (``total``: all ready, when there
was no failure), p50/p95/max spawn-to-ready of the users that got ready, failures (with
the messages users saw), the CPU seconds (user+sys, /proc) the hub process -- and, for
``outpost``, the Outpost process -- used during the burst, and the peak RSS of both
(sampled every 0.25 s). Bursts alternate between the configurations, ABBA (direct,
outpost, outpost, direct, ...), ``--repeats`` of each (default 3); the table shows
medians with their ranges.

    .venv/bin/python benchmarks/burst_bench.py [--users 40] [--repeats 3] [--json PATH] [--keep]

Run from the repository root; never beside other heavy work (40 notebooks starting at
once on two cores is the load being measured). Goal shown as ok/MISS (issue 15):
outpost total / direct total <= 1.0 with every user ready; the exit status is non-zero
only when the benchmark itself fails (a hub or the Outpost does not start, a notebook is
left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc is imported

import requests  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from benchmarks.common import (  # noqa: E402
    HubPair,
    machine_info,
    our_processes,
    source_info,
    versions,
    warm_notebook_imports,
    write_json,
)
from tests.harness.e2e_driver import read_progress  # noqa: E402
from tests.harness.hub import TOKEN, JupyterHubProcess  # noqa: E402
from tests.harness.procs import cpu_seconds, rss_kib  # noqa: E402
from tests.harness.util import percentile  # noqa: E402

TARGET_RATIO = 1.0
LABELS = ("direct", "outpost")
XSRF = re.compile(r'name="_xsrf"\s+value="([^"]+)"')
EVENT_SOURCE = re.compile(r'new EventSource\("([^"]+)"\)')
PAGE_ERROR = re.compile(r'<p class="[^"]*error[^"]*"[^>]*>(.*?)</p>|<div class="error">(.*?)</div>', re.S)


class BenchmarkError(Exception):
    """The benchmark could not run (as opposed to: users saw failures, or the ratio missed)."""


# --- one user, as a browser --------------------------------------------------------------------


class UserRun:
    """One user of a burst: login, spawn, progress; what happened and when (monotonic)."""

    def __init__(self, hub_url: str, name: str, timeout: float):
        self.hub_url = hub_url
        self.name = name
        self.timeout = timeout
        self.sent: float | None = None  # just before the login POST
        self.ended: float | None = None  # the ready or failed event, or giving up
        self.ready = False
        self.failure = ""  # what the user saw, if not ready

    def run(self, not_before: float) -> None:
        try:
            self._run(not_before)
        except Exception as e:  # counted, not raised: a failure a user would see
            self.failure = self.failure or f"{type(e).__name__}: {e}"
        finally:
            if self.ended is None:
                self.ended = time.monotonic()

    def _run(self, not_before: float) -> None:
        browser = requests.Session()
        page = browser.get(f"{self.hub_url}/hub/login", timeout=self.timeout)
        page.raise_for_status()
        xsrf = XSRF.search(page.text)
        time.sleep(max(0.0, not_before - time.monotonic()))
        self.sent = time.monotonic()
        # the hub creates the user and spawns (no options form); slow_spawn_timeout 0
        # sends the browser on to the spawn-pending page at once
        r = browser.post(
            f"{self.hub_url}/hub/login",
            data={"username": self.name, "password": "any", "_xsrf": xsrf.group(1) if xsrf else ""},
            timeout=self.timeout,
        )
        source = EVENT_SOURCE.search(r.text)
        if source is None:  # no progress to follow: the page says what went wrong
            m = PAGE_ERROR.search(r.text)
            said = re.sub(r"<[^>]+>|\s+", " ", (m.group(1) or m.group(2)) if m else "").strip()
            self.ended = time.monotonic()
            self.failure = f"{r.status_code} at {r.url.split(self.hub_url, 1)[-1]}: {said or r.text[:200]}"
            return
        url = html.unescape(source.group(1))
        events = read_progress(f"{self.hub_url}{url}", {"Cookie": _cookie_header(browser)}, self.timeout)
        self.ended = time.monotonic()
        last = events[-1] if events else {}
        if last.get("ready"):
            self.ready = True
        else:
            self.failure = last.get("message") or "the progress stream ended without ready or failed"

    @property
    def elapsed(self) -> float | None:
        return None if self.sent is None or self.ended is None else self.ended - self.sent


def _cookie_header(session: requests.Session) -> str:
    return "; ".join(f"{c.name}={c.value}" for c in session.cookies)


# --- one burst -----------------------------------------------------------------------------------


class Sampler:
    """Peak RSS (KiB) of some processes, sampled every `interval` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25):
        self.pids = pids
        self.peak = {label: 0 for label in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for label, pid in self.pids.items():
            try:
                self.peak[label] = max(self.peak[label], rss_kib(pid))
            except (OSError, LookupError):
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def run_users(hub_url: str, names: list[str], window: float, timeout: float) -> tuple[list[UserRun], float, float]:
    """The users' browsers in threads of their own, user i from i x window / N on; returns
    the runs, the moment the first login POST was due and the moment the last stream ended."""
    runs = [UserRun(hub_url, name, timeout) for name in names]
    begin = time.monotonic() + 1.0  # time for every thread to fetch its login page
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(run.run, begin + i * window / len(runs)) for i, run in enumerate(runs)]
        for future in futures:
            future.result()
    return runs, begin, max(run.ended for run in runs)


def check_reachable(hub: JupyterHubProcess, runs: list[UserRun]) -> None:
    """Every ready notebook answers through the proxy (not timed); one that does not is a
    failure."""

    def one(run: UserRun) -> None:
        try:
            r = requests.get(
                f"{hub.url}/user/{run.name}/api/status", headers={"Authorization": f"token {TOKEN}"}, timeout=30
            )
            ok = r.status_code == 200
            why = f"status {r.status_code}"
        except requests.RequestException as e:
            ok, why = False, str(e)
        if not ok:
            run.ready = False
            run.failure = f"ready, but /user/{run.name}/api/status through the proxy: {why}"

    ready = [run for run in runs if run.ready]
    if ready:
        with ThreadPoolExecutor(max_workers=min(16, len(ready))) as pool:
            list(pool.map(one, ready))


async def burst(pair: HubPair, label: str, names: list[str], args, running: dict[str, list[str]]) -> dict:
    """One burst of len(names) users at one hub; the servers are stopped afterwards."""
    hub = pair.hubs[label]
    pids = {"hub": hub.proc.pid}
    if label == "outpost":
        pids["outpost"] = pair.site.op.proc.pid
    running[label].extend(names)
    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    with Sampler(pids) as sampler:
        runs, begin, end = await asyncio.to_thread(run_users, hub.url, names, args.window, args.timeout)
        cpu1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    await asyncio.to_thread(check_reachable, hub, runs)

    # stop every server (all at once), then wait until no notebook of this hub is left
    await asyncio.gather(*(hub.stop_server(name) for name in names))
    for name in names:
        running[label].remove(name)
    homes = pair.root / "direct-home" if label == "direct" else pair.site.op.workdir / "home"
    deadline = time.monotonic() + 60
    while homes.exists() and our_processes(homes) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)

    times = [run.elapsed for run in runs if run.ready]
    failures: dict[str, int] = {}
    for run in runs:
        if not run.ready:
            failures[run.failure] = failures.get(run.failure, 0) + 1
    return {
        "total_s": end - begin,
        "p50_s": percentile(times, 50) if times else None,
        "p95_s": percentile(times, 95) if times else None,
        "max_s": max(times) if times else None,
        "ready": len(times),
        "failures": sum(failures.values()),
        "failure_messages": failures,
        "hub_cpu_s": cpu1["hub"] - cpu0["hub"],
        "outpost_cpu_s": cpu1["outpost"] - cpu0["outpost"] if "outpost" in pids else None,
        "hub_rss_peak_kib": sampler.peak["hub"],
        "outpost_rss_peak_kib": sampler.peak.get("outpost"),
        "spawn_to_ready_s": sorted(times),
    }


async def run(args, root: Path) -> dict[str, list[dict]]:
    # the same generous timeouts at both hubs (and at the site's Spawner): the benchmark
    # shows how long a class waits, not where a hub gives up
    timeouts = f"c.Spawner.start_timeout = {args.timeout:g}\nc.Spawner.http_timeout = {args.timeout:g}\n"
    pair = HubPair(root, hub_extra=timeouts, site_extra=timeouts + args.site_config)
    running: dict[str, list[str]] = {label: [] for label in LABELS}
    results: dict[str, list[dict]] = {label: [] for label in LABELS}
    try:
        setup_s = await pair.start()
        print(f"hubs and Outpost up in {setup_s:.1f}s (work dir {root})", flush=True)
        await warm_notebook_imports()
        # one user each first (not measured): the hub's first SSH connect, first imports
        for label in LABELS:
            warm = await burst(pair, label, [f"warm-{label}"], args, running)
            if warm["failures"]:
                raise BenchmarkError(f"{label}: the warm-up spawn failed: {warm['failure_messages']}")
        for r in range(args.repeats):
            for label in LABELS if r % 2 == 0 else LABELS[::-1]:  # ABBA
                names = [f"b{r + 1}{label[0]}-{i:03d}" for i in range(1, args.users + 1)]
                res = await burst(pair, label, names, args, running)
                results[label].append(res)
                p95 = f"{res['p95_s']:6.2f}s" if res["p95_s"] is not None else "     -"
                print(
                    f"  {label:8s} burst {r + 1}: all done {res['total_s']:6.2f}s  p95 {p95}  "
                    f"ready {res['ready']}/{args.users}  hub CPU {res['hub_cpu_s']:.2f}s"
                    + (f"  Outpost CPU {res['outpost_cpu_s']:.2f}s" if res["outpost_cpu_s"] is not None else ""),
                    flush=True,
                )
                for message, count in res["failure_messages"].items():
                    print(f"      {count} x {message}", flush=True)
                await asyncio.sleep(args.settle)
    finally:
        problems = await pair.stop(running)
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
    if any(p.startswith("left behind") for p in problems):
        raise BenchmarkError("notebooks were left behind (see above)")
    return results


# --- summary ------------------------------------------------------------------------------------

FIGURES = ("total_s", "p50_s", "p95_s", "max_s", "hub_cpu_s", "outpost_cpu_s", "hub_rss_peak_kib", "outpost_rss_peak_kib")


def median_range(values: list) -> tuple | None:
    """(median, min, max) of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        label: {figure: median_range([r[figure] for r in runs]) for figure in FIGURES}
        for label, runs in results.items()
    }


def fmt(mr: tuple | None, scale: float = 1.0, digits: int = 2) -> str:
    if mr is None:
        return "-"
    med, lo, hi = (v / scale for v in mr)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def print_table(results: dict[str, list[dict]], summary: dict, users: int) -> tuple[float | None, int]:
    print()
    print(f"burst of {users} users within one second, {len(results['direct'])} bursts per config; "
          "median (range), seconds; RSS peak in MiB")  # fmt: skip
    rows = [("figure", *LABELS)]
    names = {
        "total_s": "all done (login -> last ready/failed)",
        "p50_s": "spawn-to-ready p50",
        "p95_s": "spawn-to-ready p95",
        "max_s": "spawn-to-ready max",
        "hub_cpu_s": "hub process CPU",
        "outpost_cpu_s": "Outpost process CPU",
        "hub_rss_peak_kib": "hub RSS peak",
        "outpost_rss_peak_kib": "Outpost RSS peak",
    }
    for figure in FIGURES:
        scale, digits = (1024.0, 0) if figure.endswith("_kib") else (1.0, 2)
        rows.append((names[figure], *(fmt(summary[label][figure], scale, digits) for label in LABELS)))
    failures = {label: sum(r["failures"] for r in results[label]) for label in LABELS}
    rows.append(("failures (all bursts)", *(str(failures[label]) for label in LABELS)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for label in LABELS:
        messages: dict[str, int] = {}
        for r in results[label]:
            for message, count in r["failure_messages"].items():
                messages[message] = messages.get(message, 0) + count
        for message, count in messages.items():
            print(f"{label}: {count} x {message}")
    d, o = summary["direct"]["total_s"], summary["outpost"]["total_s"]
    ratio = o[0] / d[0] if d and o else None
    total_failures = sum(failures.values())
    if ratio is not None:
        ok = "ok" if ratio <= TARGET_RATIO and failures["outpost"] == 0 else "MISS"
        print(
            f"ratio outpost/direct of the medians of 'all done': {ratio:.2f}  "
            f"(goal <= {TARGET_RATIO} with every user ready)  {ok}"
        )
    return ratio, total_failures


def json_document(results: dict, summary: dict, ratio: float | None, users: int, args, total: float) -> dict:
    k = f"burst{users}"

    def med(label: str, figure: str, digits: int = 3):
        mr = summary[label][figure]
        return None if mr is None else round(mr[0], digits)

    def rng(label: str, figure: str, digits: int = 3):
        mr = summary[label][figure]
        return None if mr is None else [round(mr[1], digits), round(mr[2], digits)]

    doc = {
        f"{k}_direct_total_s": med("direct", "total_s"),
        f"{k}_outpost_total_s": med("outpost", "total_s"),
        f"{k}_ratio": None if ratio is None else round(ratio, 3),
        f"{k}_ratio_target": TARGET_RATIO,
        f"{k}_outpost_p95_s": med("outpost", "p95_s"),
        f"{k}_failures": sum(r["failures"] for label in LABELS for r in results[label]),
        f"{k}_hub_cpu_s_direct": med("direct", "hub_cpu_s"),
        f"{k}_hub_cpu_s_outpost": med("outpost", "hub_cpu_s"),
        f"{k}_outpost_cpu_s": med("outpost", "outpost_cpu_s"),
    }
    for label in LABELS:
        for figure in ("total_s", "p50_s", "p95_s", "max_s", "hub_cpu_s"):
            doc[f"{k}_{label}_{figure}_range"] = rng(label, figure)
        doc[f"{k}_{label}_p50_s"] = med(label, "p50_s")
        doc[f"{k}_{label}_max_s"] = med(label, "max_s")
        doc[f"{k}_{label}_failures"] = [r["failures"] for r in results[label]]
        doc[f"{k}_{label}_hub_rss_peak_kib"] = med(label, "hub_rss_peak_kib", 0)
    doc[f"{k}_direct_p95_s"] = med("direct", "p95_s")
    doc[f"{k}_outpost_cpu_s_range"] = rng("outpost", "outpost_cpu_s")
    doc[f"{k}_outpost_rss_peak_kib"] = med("outpost", "outpost_rss_peak_kib", 0)
    doc[f"{k}_runs"] = {
        label: [
            {key: (round(v, 3) if isinstance(v, float) else v) for key, v in r.items() if key != "spawn_to_ready_s"}
            | {"spawn_to_ready_s": [round(t, 3) for t in r["spawn_to_ready_s"]]}
            for r in runs
        ]
        for label, runs in results.items()
    }
    doc.update(
        {
            "users": users,
            "repeats": args.repeats,
            "window_s": args.window,
            "timeout_s": args.timeout,
            "site_config": args.site_config,
            "total_run_s": round(total, 1),
            "machine": machine_info(**versions()),
            "source": source_info(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=40, help="users per burst (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per configuration, alternating (default 3)")
    parser.add_argument("--window", type=float, default=1.0, help="seconds over which a burst's logins are spread (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=180.0,
        help="Spawner.start_timeout and http_timeout at both hubs and the site, and the longest wait for a "
        "user's progress stream, in seconds (default 180)",
    )  # fmt: skip
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of rest between bursts (default 3)")
    parser.add_argument(
        "--site-config", default="",
        help="lines appended to the site's outpost_config.py (e.g. 'c.Outpost.max_concurrent_starts_per_hub = 0')",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (hub, Outpost and notebook logs)")
    args = parser.parse_args(argv)
    if args.users < 1 or args.repeats < 1 or args.window < 0 or args.timeout <= 0:
        parser.error("--users and --repeats must be >= 1, --window >= 0, --timeout > 0")
    if args.site_config and not args.site_config.endswith("\n"):
        args.site_config += "\n"

    os.environ["OUTPOST_CRYPT_KEY"] = Fernet.generate_key().decode()  # the site's database key
    root = Path(tempfile.mkdtemp(prefix="burst-bench-"))
    started = time.perf_counter()
    try:
        results = asyncio.run(run(args, root))
    except (BenchmarkError, AssertionError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        print(f"logs kept in {root}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; logs kept in {root}", file=sys.stderr)
        return 130
    total = time.perf_counter() - started
    summary = summarize(results)
    ratio, _ = print_table(results, summary, args.users)
    print(f"total {total:.0f}s")
    if args.json:
        write_json(args.json, json_document(results, summary, ratio, args.users, args, total), sort_keys=False)
    if args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
