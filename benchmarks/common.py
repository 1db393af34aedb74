"""Helpers shared by the benchmarks (``bench.py``, ``tunnel_bench.py``, ``spawn_bench.py``)
and ``sshd_helper.py``.

The benchmarks run as scripts (``.venv/bin/python benchmarks/X.py``, so ``benchmarks/`` is
on ``sys.path``): ``bench.py`` and ``tunnel_bench.py`` import this as ``common``,
``spawn_bench.py`` (which puts the repo root first on ``sys.path`` for ``tests.*``) as
``benchmarks.common``. ``sshd_helper`` tries the relative import first: the tests import it
as ``benchmarks.sshd_helper``, ``tunnel_bench.py`` as ``sshd_helper``. Standard library only.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info(**extra) -> dict:
    """The ``machine`` entry of a benchmark's JSON: CPUs usable by this process, Python
    version and platform, then ``extra`` (e.g. versions of the software under test)."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count()
    return {
        "nproc": nproc,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }


def write_json(path: str | Path, document: dict, *, sort_keys: bool = True) -> Path:
    """Write document as indented JSON (and a final newline) to path, creating its parent
    directories; print where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=sort_keys) + "\n")
    print(f"wrote {path}")
    return path
