"""Processes, read from /proc (Linux): children, state, memory, CPU; orphan reaping.

This machine's PID 1 does not reap orphans: a test or benchmark that leaves processes
behind on purpose (a SIGKILLed Outpost's notebooks, slurmstepd) makes itself a child
subreaper and reaps them (:class:`Subreaper`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading

PR_SET_CHILD_SUBREAPER = 36


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None if the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def process_state(pid: int) -> str | None:
    """The state letter of pid (R, S, D, Z, ...), or None if there is no such process."""
    fields = _stat(pid)
    return fields[0] if fields else None


def process_name(pid: int) -> str | None:
    """The command name of pid (``/proc/<pid>/comm``), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    return process_state(pid) not in (None, "Z", "X")


def children_of(pid: int, *, live: bool = False) -> list[int]:
    """The direct children of pid; with ``live``, zombies left out."""
    kids = []
    for kid in _pids():
        fields = _stat(kid)
        if fields and int(fields[1]) == pid and not (live and fields[0] in ("Z", "X")):
            kids.append(kid)
    return kids


def descendants_of(pid: int) -> list[int]:
    """Children of pid, theirs, and so on (zombies left out)."""
    found, todo = [], [pid]
    while todo:
        for kid in children_of(todo.pop(), live=True):
            found.append(kid)
            todo.append(kid)
    return found


def processes_with_argv(arg: str) -> list[int]:
    """Live processes that have arg as one of their command line arguments."""
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv and process_alive(pid):
            found.append(pid)
    return found


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise LookupError(f"no {name} in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    return _status_field(pid, "VmRSS")


def threads_of(pid: int) -> int:
    return _status_field(pid, "Threads")


def open_fds(pid: int) -> int:
    """How many file descriptors pid has open (-1 if that cannot be read)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15, in clock ticks
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen | None, timeout: float, sig: int = signal.SIGTERM) -> bool:
    """Send sig to proc if it still runs, wait up to timeout seconds for it to exit, then
    SIGKILL it. True if it needed the SIGKILL."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def set_child_subreaper(on: bool = True) -> None:
    """Make this process the reaper of its descendants' orphans (or stop being it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Subreaper:
    """Orphans reparent to this process (``start()`` makes it a child subreaper); a thread
    reaps the pids in ``pids`` once they exit. ``stop()`` ends both."""

    def __init__(self):
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        set_child_subreaper(True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        set_child_subreaper(False)

    def _run(self):
        while not self._stop.wait(0.05):
            for pid in list(self.pids):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue  # not our child (yet)
                if done:
                    self.pids.discard(pid)
