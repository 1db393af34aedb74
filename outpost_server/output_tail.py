"""The notebook's last words: the end of its output, when its start failed or it exited.

The user otherwise reads only an exception message or an exit code. The tail travels
with the FAILED event (``EventsResponse.output_tail``) and with Poll's STOPPED status
(``ServerStatus.output_tail``), always bounded (``Outpost.output_tail_lines`` and
``output_tail_bytes``) and redacted like the Outpost's log (the values of the server's
secret env keys become ``[secret]``, hosting.py).

Where a tail comes from, the first that applies:

1. The hosted Spawner's own hook: a method ``outpost_output_tail(self, max_lines,
   max_bytes)`` (sync or async) that returns the end of the notebook's output as str or
   bytes (None: none). A site adds it to its Spawner subclass when it knows where its
   notebooks write (a pod's log, a UNICORE job's stdout).
2. batchspawner: the job's output file, the ``--output`` (``-o``, ``Output =``) of its
   batch script, rendered as batchspawner renders it, with the job id. Read by the
   Outpost itself, so it must be able to read it (root, or the notebook's account), and
   read safely: no symlink, a regular file with one link, owned by the notebook's account
   or by the Outpost's own user.
3. Spawners that run a local process (LocalProcessSpawner and its subclasses): the
   Outpost captures the process's stdout and stderr itself (``output_tail_capture``),
   through a pipe to a small helper process (_capture.py) that keeps only the end of it,
   in two files of at most ``output_tail_bytes`` together, in a private directory of the
   Outpost's (``state_dir``/output-tail, mode 0700; files 0600). The notebook's user
   cannot read them, and writing more only replaces older output.

The output is the notebook user's own writing: it is shown as text, never as HTML, and
control characters (other than newline and tab) are replaced, so a terminal that shows
the log does not run escape sequences from it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pwd
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, Spawner

from .hosting import REDACTED, secrets_in_env
from .orphans import start_marker
from .records import Record

log = logging.getLogger("outpost.output_tail")

#: the subdirectory of the Outpost's state_dir that holds the captured output
CAPTURE_SUBDIR = "output-tail"
#: the helper process that keeps the end of a local notebook's output
CAPTURE_HELPER = Path(__file__).with_name("_capture.py")
#: how long a read waits for the helper to take in the last of an exited notebook's output
DRAIN_SECONDS = 1.0

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# --- bounding and redacting (pure) ---------------------------------------------------------


def bound_tail(data: bytes | str, *, max_lines: int, max_bytes: int, secrets: tuple[str, ...] = (), partial_start: bool = False) -> str:
    """The end of data as the user may see it: secrets replaced by ``[secret]``, control
    characters (but newline and tab) by U+FFFD, at most max_lines lines and max_bytes
    bytes (UTF-8).

    ``partial_start``: data is itself a window of a longer output, so it may begin in
    the middle of a character, or of a secret, which redaction cannot recognise then: as
    many characters as the longest secret has are dropped from its first line (the rest
    of that line stays). Redaction then sees every secret whole, so none is shown in part.
    """
    if max_lines <= 0 or max_bytes <= 0 or not data:
        return ""
    if isinstance(data, bytes):
        if partial_start:
            data = data.lstrip(bytes(range(0x80, 0xC0)))  # a character cut by the window
        text = data.decode("utf-8", "replace")
    else:
        text = str(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if partial_start and secrets:
        first, newline, rest = text.partition("\n")
        text = first[max(map(len, secrets)) :] + newline + rest
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _CONTROL.sub("\ufffd", text)
    lines = text.rstrip("\n").split("\n")[-max_lines:]
    text = "\n".join(lines).strip("\n")
    encoded = text.encode()
    if len(encoded) > max_bytes:
        text = encoded[-max_bytes:].decode("utf-8", "ignore")  # a cut character is dropped
    return text


# --- batchspawner: the job's output file --------------------------------------------------

# the output directive of a batch script, per batch system: (regex, job id placeholders)
_OUTPUT_DIRECTIVES = (
    (re.compile(r"^#SBATCH\s+(?:--output[=\s]|-o\s*)\s*(\S+)", re.M), "slurm"),
    (re.compile(r"^#BSUB\s+-o\s+(\S+)", re.M), "lsf"),
    (re.compile(r"^#PBS\s+-o\s+(\S+)", re.M), "plain"),
    (re.compile(r"^#\$\s+-o\s+(\S+)", re.M), "plain"),
    (re.compile(r"^\s*Output\s*=\s*(\S+)", re.M | re.I), "plain"),
)
_SLURM_CHDIR = re.compile(r"^#SBATCH\s+(?:--chdir[=\s]|-D\s*)\s*(\S+)", re.M)
_SLURM_JOB_NAME = re.compile(r"^#SBATCH\s+(?:--job-name[=\s]|-J\s*)\s*(\S+)", re.M)


def output_path_in_script(script: str, *, job_id: str, user: str) -> str | None:
    """The file a batch script sends the job's output to, for job job_id (None: the
    script names none, or names it with a pattern this cannot fill in)."""
    for regex, kind in _OUTPUT_DIRECTIVES:
        found = regex.search(script)
        if found is None:
            continue
        path = found.group(1).strip("'\"")
        if kind == "slurm":
            name = _SLURM_JOB_NAME.search(script)
            fill = {"j": job_id, "u": user, "x": name.group(1).strip("'\"") if name else "", "%": "%"}
            try:
                path = re.sub(r"%(.)", lambda m: fill[m.group(1)], path)
            except KeyError:
                return None  # %A, %N, ...: not this job's file alone, or not known here
            if not os.path.isabs(path):
                chdir = _SLURM_CHDIR.search(script)
                if chdir is None:
                    return None
                path = os.path.join(chdir.group(1).strip("'\""), path)
        elif kind == "lsf":
            path = path.replace("%J", job_id)
            if "%" in path:
                return None  # %I, ...: not known here
        return path if os.path.isabs(path) else None
    return None


def batch_output_path(spawner: Spawner, job_id: str) -> str | None:
    """The output file of a batchspawner job, from its batch script rendered the way
    batchspawner's submit_batch_script renders it."""
    from batchspawner.batchspawner import format_template

    subvars = spawner.get_req_subvars()
    subvars["cmd"] = spawner.cmd_formatted_for_batch()
    subvars.update(spawner.user_options or {})
    script = format_template(spawner.batch_script, **subvars)
    return output_path_in_script(script, job_id=job_id, user=spawner.user.name)


def is_batch_spawner(spawner: Spawner) -> bool:
    try:
        from batchspawner import BatchSpawnerBase
    except ImportError:
        return False
    return isinstance(spawner, BatchSpawnerBase)


def read_file_tail(path: str, max_bytes: int, owners: set[int]) -> tuple[bytes, bool]:
    """The last max_bytes bytes of the file at path, and whether it holds more.

    The file is the notebook user's, read by a process that may be root: no symlink at
    the end of the path (O_NOFOLLOW), no FIFO or device (a regular file), no hard link to
    someone else's file (one link), owned by one of owners. Anything else is refused with
    PermissionError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid not in owners:
            raise PermissionError(f"{path} is not a regular file with one link of the notebook's account")
        start = max(0, info.st_size - max_bytes)
        os.lseek(fd, start, os.SEEK_SET)
        chunks, left = [], max_bytes
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), start > 0
    finally:
        os.close(fd)


def account_uids(name: str) -> set[int]:
    """Who may own a file the Outpost reads for the notebook of account name: the
    account, and the Outpost's own user (jobs of a site that runs them as itself)."""
    uids = {os.geteuid()}
    try:
        uids.add(pwd.getpwnam(name).pw_uid)
    except KeyError:
        pass
    return uids


# --- local processes: the capture ---------------------------------------------------------


def captures_output(spawner: Spawner) -> bool:
    """Whether the Outpost captures this Spawner's notebook output itself: a Spawner that
    runs a local process with Popen, whose site did not send its stdout or stderr
    elsewhere (popen_kwargs)."""
    if not isinstance(spawner, LocalProcessSpawner):
        return False
    kwargs = spawner.popen_kwargs or {}
    return "stdout" not in kwargs and "stderr" not in kwargs


class OutputTails:
    """Gets the tail of a server's notebook output (the manager's; see the module)."""

    def __init__(self, *, max_lines: int, max_bytes: int, capture: bool, directory: str | Path, timeout: float):
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.capture = capture and self.enabled
        self.directory = Path(directory)
        self.timeout = timeout
        #: marker -> (helper process, the write end the Spawner's Popen passes on)
        self._helpers: dict[str, subprocess.Popen] = {}
        self._write_ends: dict[str, int] = {}
        #: marker -> the last job id a batch Spawner had (it forgets it when the job ends)
        self._job_ids: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.max_lines > 0 and self.max_bytes > 0

    @staticmethod
    def marker(rec: Record) -> str:
        return start_marker(rec.hub, rec.name, rec.start_id)

    def _paths(self, marker: str) -> tuple[Path, Path]:
        current = self.directory / f"{marker}.out"
        return current.with_name(current.name + ".1"), current

    def _private_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=False)
        except FileExistsError:
            pass
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(
                f"{self.directory} must be a directory of uid {os.geteuid()} with mode 0700, "
                "not a symlink; the Outpost does not capture notebook output there"
            )

    # the capture's life: attach before start(), started() after it, forget() at Stop

    def attach(self, rec: Record, spawner: Spawner) -> None:
        """Before spawner.start(): send its notebook's stdout and stderr to a capture of
        their end; or, for a batch Spawner, remember its job id (batchspawner forgets it
        when the job ends, before its start fails). Never fails the start: without a
        capture there is just no tail."""
        marker = self.marker(rec)
        if self.enabled and is_batch_spawner(spawner):

            def remember(change) -> None:
                if change["new"]:
                    self._job_ids[marker] = change["new"]

            spawner.observe(remember, names="job_id")
            return
        if not self.capture or not captures_output(spawner):
            return
        try:
            self._private_directory()
            _, current = self._paths(marker)
            read_end, write_end = os.pipe()
            try:
                helper = subprocess.Popen(
                    # -S: no site import (the helper needs the standard library only):
                    # 7 ms of CPU to start instead of 20, once per notebook (a class's burst)
                    [sys.executable, "-I", "-S", str(CAPTURE_HELPER), str(current), str(max(1, self.max_bytes // 2))],
                    stdin=read_end,
                    stdout=subprocess.DEVNULL,  # stderr: the Outpost's, where the output goes on to
                    env={"LC_ALL": "C"},  # never the start's marker: orphans.py finds notebooks by it
                    start_new_session=True,  # the Outpost's signals (SIGINT at a terminal) are not its
                    close_fds=True,
                )
            except BaseException:
                os.close(write_end)
                raise
            finally:
                os.close(read_end)
        except Exception as e:
            log.warning("Not capturing the output of %s/%s: %s", rec.hub, rec.name, e)
            return
        self._helpers[marker] = helper
        self._write_ends[marker] = write_end
        spawner.popen_kwargs = {**spawner.popen_kwargs, "stdout": write_end, "stderr": write_end}

    def started(self, rec: Record, spawner: Spawner) -> None:
        """After spawner.start() ended (any way): the notebook has its copy of the pipe's
        write end, or never will; the Outpost's own copy is closed, so the helper ends
        when the notebook does."""
        write_end = self._write_ends.pop(self.marker(rec), None)
        if write_end is None:
            return
        os.close(write_end)
        kwargs = dict(spawner.popen_kwargs)
        if kwargs.get("stdout") == write_end:
            kwargs.pop("stdout", None)
            kwargs.pop("stderr", None)
            spawner.popen_kwargs = kwargs  # a restarted start makes its own capture

    def forget(self, rec: Record) -> None:
        """The server is forgotten (Stop, or a new start replaces it): end its capture
        and remove its files."""
        marker = self.marker(rec)
        self._job_ids.pop(marker, None)
        write_end = self._write_ends.pop(marker, None)
        if write_end is not None:
            os.close(write_end)
        helper = self._helpers.pop(marker, None)
        if helper is not None and helper.poll() is None:
            helper.kill()  # whatever still holds the pipe gets EPIPE: its server is stopped
            try:
                helper.wait(1)
            except subprocess.TimeoutExpired:
                log.warning("The output capture of %s/%s (pid %d) did not end", rec.hub, rec.name, helper.pid)
        for path in self._paths(marker):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("Could not remove %s: %s", path, e)

    def sweep(self, keep: set[str]) -> int:
        """At start-up: remove the captures of starts that are no longer the Outpost's
        (forgotten while it was down); keep those of the markers in keep."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        for path in self.directory.iterdir():
            marker = path.name.split(".", 1)[0]
            if marker not in keep:
                try:
                    path.unlink()
                    removed += 1
                except OSError as e:
                    log.warning("Could not remove %s: %s", path, e)
        return removed

    async def _drain(self, marker: str) -> None:
        """Give the helper up to DRAIN_SECONDS to take in the last of the output (it ends
        when the notebook has exited)."""
        helper = self._helpers.get(marker)
        if helper is None:
            return
        deadline = time.monotonic() + DRAIN_SECONDS
        while helper.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _read_capture(self, marker: str) -> tuple[bytes, bool]:
        old, current = self._paths(marker)
        data, partial = b"", False
        for path in (old, current):
            try:
                chunk, cut = read_file_tail(str(path), self.max_bytes + 4096, {os.geteuid()})
            except FileNotFoundError:
                continue
            if path == old:
                partial = True  # older output was dropped: its first line may be cut
            data += chunk
            partial = partial or cut
        return data, partial

    # reading

    async def read(self, rec: Record, spawner: Spawner | None, state: dict | None = None) -> str:
        """The tail of rec's notebook output ("" if there is none, or getting it failed:
        logged, never raised). ``state``: the Spawner's last stored state, for a Spawner
        that forgot its job when it stopped (batchspawner clears its job id)."""
        if not self.enabled:
            return ""
        try:
            async with asyncio.timeout(self.timeout):
                data, partial = await self._get(rec, spawner, state or {})
        except Exception as e:
            if isinstance(e, TimeoutError):
                e = TimeoutError(f"not got within {self.timeout:g}s (c.Outpost.output_tail_timeout)")
            log.warning("Could not get the output tail of %s/%s: %s: %s", rec.hub, rec.name, type(e).__name__, e)
            return ""
        if not data:
            return ""
        return bound_tail(
            data, max_lines=self.max_lines, max_bytes=self.max_bytes,
            secrets=secrets_in_env(rec.spec.env), partial_start=partial,
        )  # fmt: skip

    async def _get(self, rec: Record, spawner: Spawner | None, state: dict) -> tuple[bytes | str, bool]:
        if spawner is not None:
            hook = getattr(spawner, "outpost_output_tail", None)
            if callable(hook):
                result = hook(self.max_lines, self.max_bytes)
                if inspect.isawaitable(result):
                    result = await result
                return result or "", False
            if is_batch_spawner(spawner):
                job_id = spawner.job_id or self._job_ids.get(self.marker(rec)) or str(state.get("job_id") or "")
                if not job_id:
                    return "", False
                path = batch_output_path(spawner, job_id)
                if path is None:
                    log.info("The batch script of %s/%s names no output file this can read", rec.hub, rec.name)
                    return "", False
                owners = account_uids(spawner.user.name)
                log.debug("Reading the output tail of %s/%s from %s", rec.hub, rec.name, shlex.quote(path))
                try:
                    return await asyncio.to_thread(read_file_tail, path, self.max_bytes + 4096, owners)
                except FileNotFoundError:
                    return "", False
        marker = self.marker(rec)
        await self._drain(marker)
        return await asyncio.to_thread(self._read_capture, marker)
