"""Helpers shared by the benchmarks (``bench.py``, ``soak.py``, ``tunnel_bench.py``,
``spawn_bench.py``) and ``sshd_helper.py``.

The benchmarks run as scripts (``.venv/bin/python benchmarks/X.py``, so ``benchmarks/`` is
on ``sys.path``): ``bench.py``, ``soak.py`` and ``tunnel_bench.py`` import this as ``common``,
``spawn_bench.py`` (which puts the repo root first on ``sys.path`` for ``tests.*``) as
``benchmarks.common``. ``sshd_helper`` tries the relative import first: the tests import it
as ``benchmarks.sshd_helper``, ``tunnel_bench.py`` as ``sshd_helper``. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
