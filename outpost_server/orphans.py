"""Finding the local processes of a start the Outpost lost track of.

Every hosted Spawner's environment carries ``JUPYTERHUB_OUTPOST_START``, a digest of
(hub, server name, start id). A Spawner that runs the notebook on this host (as
LocalProcessSpawner does) passes it on to the notebook's process. If the Outpost is
killed after that process started but before the Spawner's state (its pid) reached the
database, the restarted Outpost cannot stop it through the Spawner; it finds it here by
the marker instead, and stops it.

Processes elsewhere (a batch job, a pod) are not visible here: for those the manager
stores the Spawner's state as soon as it changes during the start (see
``LifecycleManager._checkpoint_state``), which is when the Spawner itself first knows
the job or pod it made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("outpost.orphans")

START_MARKER_ENV = "JUPYTERHUB_OUTPOST_START"


def start_marker(hub: str, server_name: str, start_id: str) -> str:
    """The marker of one start (no names in it: it is visible in the process table)."""
    digest = hashlib.sha256("\0".join((hub, server_name, start_id)).encode())
    return digest.hexdigest()[:32]


def find_marked(markers: set[str], proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> marker of every process on this host whose environment holds a marker."""
    if not markers:
        return {}
    needles = {f"{START_MARKER_ENV}={m}".encode(): m for m in markers}
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for item in environ.split(b"\0"):
            marker = needles.get(item)
            if marker is not None:
                found[int(entry.name)] = marker
                break
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def terminate(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the pids still alive at the end."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
    return [p for p in alive if _alive(p)]


def stop_marked(markers: set[str], grace: float = 5.0) -> dict[str, list[int]]:
    """Stop every local process carrying one of ``markers``; marker -> pids stopped."""
    found = find_marked(markers)
    if not found:
        return {}
    left = terminate(sorted(found), grace)
    if left:
        log.error("Could not stop orphaned processes %s", left)
    stopped: dict[str, list[int]] = {}
    for pid, marker in found.items():
        stopped.setdefault(marker, []).append(pid)
    return stopped
