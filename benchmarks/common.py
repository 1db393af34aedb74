"""What the benchmarks share beyond the test harness: the Outpost process they measure
(:class:`BenchOutpost`), and the JSON they write (``machine_info()``, ``source_info()``,
``write_json()``).

The benchmarks run as scripts (``.venv/bin/python benchmarks/X.py`` from the repository
root). Each puts the repository root first on ``sys.path`` and imports by package name:
``benchmarks.common``, ``benchmarks.bench_spawners`` and ``tests.harness.*`` (the harness
the tests use: the Outpost process, a site, a hub, a private sshd, /proc helpers). One
name per module: the Outpost process imports ``benchmarks.bench_spawners`` by that name
too, and a module imported under two names would be two modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet

from tests.harness.outpost import ROOT, OutpostProcess

INSTANT = "outpost_server.testing.InstantSpawner"


class BenchOutpost(OutpostProcess):
    """The ``jupyterhub-outpost`` process under measurement: the harness's OutpostProcess in
    a temp dir of its own, with SQLite there (``db_path``), a fresh database encryption key,
    ``spawner_class``, the outpost_config.py text ``config`` and warnings only in its log.
    ``launch()``, ``terminate()`` (SIGTERM, SIGKILL after 15 s), ``cleanup()`` (the dir)."""

    def __init__(self, spawner_class: str = INSTANT, config: str = ""):
        workdir = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
        super().__init__(workdir, config, env={"OUTPOST_CRYPT_KEY": Fernet.generate_key().decode()})
        self.spawner_class = spawner_class
        self.db_path = workdir / "bench.sqlite"

    def launch(self) -> None:
        self.start(
            "--ip", "127.0.0.1",
            "--db-url", f"sqlite:///{self.db_path}",
            "--spawner-class", self.spawner_class,
            # traitlets' Application.log_level knows "WARN", not "WARNING"
            "--log-level", "WARN",
            # one hub with up to 2,000 servers (n=2000, the CPU run): beyond the default cap
            "--Outpost.max_servers_per_hub=0",
        )  # fmt: skip

    def terminate(self) -> None:
        if self.stop(timeout=15):
            print("the Outpost ignored SIGTERM for 15 s; killed it", file=sys.stderr)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def machine_info(**extra) -> dict:
    """The ``machine`` entry of a benchmark's JSON: CPUs usable by this process, their
    model, Python version and platform, then ``extra`` (e.g. versions of the software
    under test)."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count()
    cpu_model = platform.processor()
    try:  # Linux: the name /proc/cpuinfo gives the first CPU
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "nproc": nproc,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }


def source_info(paths=("outpost_server", "outpost_client")) -> dict:
    """What code was measured: the checkout's commit, and a digest of each file under
    paths that differs from it (benchmarks often run on a tree with uncommitted edits)."""
    def git(*args) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.rstrip("\n")  # not strip(): a porcelain line may start with a space
        except (OSError, subprocess.SubprocessError):
            return ""

    modified = {}
    for line in git("status", "--porcelain", "--", *paths).splitlines():
        name = line[3:].split(" -> ")[-1]
        try:
            modified[name] = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]
        except OSError:
            modified[name] = line[:2].strip() or "?"
    return {"commit": git("rev-parse", "HEAD"), "modified": modified}


def write_json(path: str | Path, document: dict, *, sort_keys: bool = True) -> Path:
    """Write document as indented JSON (and a final newline) to path, creating its parent
    directories; print where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=sort_keys) + "\n")
    print(f"wrote {path}")
    return path
