"""Spawners for tests, benchmarks and fault injection. Not for production.

Use them by import string, e.g. ``c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"``.

Some keep state in class attributes, over all their instances (counters, lists of calls):
those are registered with :func:`class_state`, and :func:`reset_class_state` puts them
back as they were defined (the test suite does so before each test).
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
import zlib

from jupyterhub.spawner import SimpleLocalProcessSpawner, Spawner
from traitlets import Float, Integer, List, Unicode

_CLASS_STATE: dict[type, dict[str, object]] = {}


def class_state(*names: str):
    """Class decorator: the class attributes ``names`` (defined in the class itself) are
    state shared by its instances; :func:`reset_class_state` restores them."""

    def register(cls):
        _CLASS_STATE[cls] = {name: copy.deepcopy(cls.__dict__[name]) for name in names}
        return cls

    return register


def reset_class_state() -> None:
    """Put every attribute registered with :func:`class_state` back to (a fresh copy of)
    the value it had when its class was defined."""
    for cls, initial in _CLASS_STATE.items():
        for name, value in initial.items():
            setattr(cls, name, copy.deepcopy(value))


def zoo_port(spawner: Spawner, port: int) -> int:
    """port for the servers of hub "default"; another port for each other hub.

    The Outpost fails a start whose address an active server of another hub has
    (starts.py): the fixed addresses of these Spawners stay apart between hubs.
    """
    hub = getattr(spawner, "_outpost_hub", "default")
    return port if hub == "default" else port + 1 + zlib.crc32(hub.encode()) % 20000


class InstantSpawner(Spawner):
    """start() returns at once, poll() says running: measures the Outpost, not a Spawner.
    Its address is 127.0.0.1:12345 for hub "default" (:func:`zoo_port`)."""

    async def start(self):
        return ("127.0.0.1", zoo_port(self, 12345))

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

    async def progress(self):
        # no progress events: only the Outpost's terminal event
        if False:
            yield {}


@class_state("stopped")
class SlowSpawner(Spawner):
    """Takes `delay` seconds to start, yielding progress events on the way. Its address
    is 127.0.0.1:23456 for hub "default" (:func:`zoo_port`)."""

    delay = Float(1.0, config=True, help="Seconds start() takes.")
    steps = Integer(4, config=True, help="Progress events during the start.")
    stopped = False

    async def start(self):
        await asyncio.sleep(self.delay)
        return ("127.0.0.1", zoo_port(self, 23456))

    async def progress(self):
        for i in range(self.steps):
            yield {"progress": int(100 * i / self.steps), "message": f"Step {i + 1} of {self.steps}"}
            await asyncio.sleep(self.delay / self.steps)

    async def poll(self):
        return 0 if self.stopped else None

    async def stop(self, now=False):
        self.stopped = True


class FailingSpawner(Spawner):
    """start() raises with a message meant for the user."""

    error_message = Unicode("No GPU left for you today", config=True, help="The message.")

    async def start(self):
        await asyncio.sleep(0.05)
        raise QuotaExceeded(self.error_message)

    async def poll(self):
        return 0

    async def stop(self, now=False):
        return None

    async def progress(self):
        yield {"progress": 10, "message": "Checking your quota"}


class QuotaExceeded(Exception):
    """The kind of exception a real Spawner raises when a site limit is hit."""


class NeverReadySpawner(Spawner):
    """start() never returns (until cancelled)."""

    async def start(self):
        await asyncio.Event().wait()

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


class FailingPollSpawner(InstantSpawner):
    """Starts, then every poll() raises: the Outpost must report UNKNOWN, not stopped."""

    async def poll(self):
        raise RuntimeError("scheduler unreachable")


@class_state("polls_in_flight", "polls_done", "overlaps", "exit_code")
class SlowPollSpawner(InstantSpawner):
    """Starts at once; every poll() takes `poll_delay` seconds (a slow batch scheduler), then
    answers ``exit_code`` (None: running; a test sets it to make the server "exit").

    Over all instances: ``polls_in_flight`` counts the polls running right now (for tests
    that must show the slow polls were really in flight), ``polls_done`` the finished ones,
    and ``overlaps`` the polls that began while the same Spawner's previous poll was still
    running (an Outpost should never do that).
    """

    poll_delay = Float(5.0, config=True, help="Seconds each poll() takes.")
    polls_in_flight = 0
    polls_done = 0
    overlaps = 0
    exit_code: int | None = None
    _polling = 0

    async def poll(self):
        if self._polling:
            SlowPollSpawner.overlaps += 1
        self._polling += 1
        SlowPollSpawner.polls_in_flight += 1
        try:
            await asyncio.sleep(self.poll_delay)
        finally:
            self._polling -= 1
            SlowPollSpawner.polls_in_flight -= 1
            SlowPollSpawner.polls_done += 1
        return self.exit_code


@class_state("children", "stopped_users")
class HangingStartSpawner(Spawner):
    """start() starts a real child process (``sleep``), then never returns.

    For start timeouts: whoever gives up on the start must stop() it, or the child leaks.
    ``children`` maps each user name to its child's pid; ``stopped_users`` lists the users
    whose stop() ran (both over all instances).
    """

    children: dict[str, int] = {}
    stopped_users: list[str] = []
    _proc: asyncio.subprocess.Process | None = None

    async def start(self):
        self._proc = await asyncio.create_subprocess_exec(
            "sleep", "600", stdin=asyncio.subprocess.DEVNULL
        )
        HangingStartSpawner.children[self.user.name] = self._proc.pid
        await asyncio.Event().wait()

    async def poll(self):
        if self._proc is None or self._proc.returncode is not None:
            return 0
        return None

    async def stop(self, now=False):
        HangingStartSpawner.stopped_users.append(self.user.name)
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()


@class_state("started")
class RecordingSpawner(SlowSpawner):
    """A SlowSpawner that keeps every instance whose start() ran, in ``started`` (over all
    instances, in order): for comparing the Outpost's view with the Spawners' own."""

    started: list[RecordingSpawner] = []

    async def start(self):
        RecordingSpawner.started.append(self)
        return await super().start()


class LatePortSpawner(Spawner):
    """Like batchspawner: start() waits until something sets ``self.port`` (the notebook's
    callback through the hub API relay), then returns that port."""

    async def start(self):
        self.port = 0
        while not self.port:
            await asyncio.sleep(0.02)
        return ("127.0.0.1", self.port)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


@class_state("start_hangs", "starts", "stops_begun", "stops_abandoned")
class HangingStopSpawner(InstantSpawner):
    """stop() never returns (a hung ``scancel``) until it is cancelled; start() hangs too
    while ``start_hangs`` (a test clears it to start servers normally).

    Over all instances: ``starts`` counts the start() calls, ``stops_begun`` the stop()
    calls and ``stops_abandoned`` the stop() calls that were cancelled.
    """

    start_hangs = True
    starts = 0
    stops_begun = 0
    stops_abandoned = 0

    async def start(self):
        HangingStopSpawner.starts += 1
        if HangingStopSpawner.start_hangs:
            await asyncio.Event().wait()
        return await super().start()

    async def stop(self, now=False):
        HangingStopSpawner.stops_begun += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            HangingStopSpawner.stops_abandoned += 1
            raise


# The job of LateAddressSpawner: reports its address through the Outpost's late-address
# endpoint (late.py) with its own token, as a UNICORE or batch job would. With a command
# (argv[1:]) it picks a free port, reports it and becomes that command (a notebook told
# the port by JUPYTERHUB_SERVICE_URL); without one it is a small HTTP server itself.
# LATE_JOB_HOST: the host it reports ("" leaves host out: the address it reports from).
LATE_JOB = r"""
import http.server, json, os, socket, sys, urllib.request


def report(port):
    body = {"port": port}
    host = os.environ.get("LATE_JOB_HOST", "127.0.0.1")
    if host:
        body["host"] = host
    request = urllib.request.Request(
        os.environ["OUTPOST_ADDRESS_URL"], data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"], "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        print("reported", answer.status, answer.read().decode(), flush=True)


if len(sys.argv) > 1:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    os.environ["JUPYTERHUB_SERVICE_URL"] = f"http://127.0.0.1:{port}{prefix}"
    report(port)
    os.execvp(sys.argv[1], sys.argv[1:])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("late job of " + os.environ.get("JUPYTERHUB_USER", "?")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
report(server.server_address[1])
server.serve_forever()
"""


class LateAddressSpawner(Spawner):
    """Runs a real job (:data:`LATE_JOB`, a real process) that reports its own address
    through the Outpost's late-address endpoint. ``mode``: "none" (start() returns None
    once the job runs: a UNICORE-like submit), "wait" (start() waits for self.port, as
    batchspawner's does, then returns it) or "hang" (start() never returns by itself)."""

    mode = Unicode("none", config=True, help="none, wait or hang (see the class).")
    job_cmd = List(
        Unicode(), config=True, help="A command the job reports for and then becomes (empty: the job serves HTTP)."
    )

    proc: asyncio.subprocess.Process | None = None
    pid = 0

    async def start(self):
        self.port = 0
        env = self.get_env()
        for key in ("PATH", "HOME"):  # what a batch job's login environment has
            if key in os.environ:
                env.setdefault(key, os.environ[key])
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LATE_JOB, *self.job_cmd, env=env, start_new_session=True
        )
        self.pid = self.proc.pid
        if self.mode == "wait":
            while not self.port:
                await asyncio.sleep(0.05)
            return (self.ip, self.port)
        if self.mode == "hang":
            await asyncio.Event().wait()
        return None

    def get_state(self):
        state = super().get_state()
        if self.pid:
            state["pid"] = self.pid
        return state

    def load_state(self, state):
        super().load_state(state)
        self.pid = state.get("pid", 0)

    async def poll(self):
        if self.proc is not None:
            return self.proc.returncode
        return None if self.pid else 0

    async def stop(self, now=False):
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        self.pid = 0
@class_state("listening_at", "paths", "exit_status")
class LateListenSpawner(Spawner):
    """A notebook that starts listening late: start() returns its address at once; an HTTP
    server (answering 200 to any GET) listens there only ``listen_delay`` seconds later
    (negative: never). ``listening_at`` (time.monotonic() when it began to listen, over
    all instances), ``paths`` (what was asked of it); poll() answers ``exit_status``."""

    listen_delay = Float(1.0, config=True, help="Seconds until the server listens (negative: never).")
    listening_at: list[float] = []
    paths: list[str] = []
    exit_status = None

    async def start(self):
        import socket
        import time

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens at the port until the server below does

        async def answer(reader, writer):
            request = await reader.readuntil(b"\r\n\r\n")
            LateListenSpawner.paths.append(request.split(b" ")[1].decode())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()

        async def listen_later():
            await asyncio.sleep(self.listen_delay)
            self._late_server = await asyncio.start_server(answer, "127.0.0.1", port)
            LateListenSpawner.listening_at.append(time.monotonic())

        if self.listen_delay >= 0:
            self._late_listener = asyncio.ensure_future(listen_later())
        return ("127.0.0.1", port)

    async def poll(self):
        return LateListenSpawner.exit_status

    async def stop(self, now=False):
        listener = getattr(self, "_late_listener", None)
        if listener is not None:
            listener.cancel()
        server = getattr(self, "_late_server", None)
        if server is not None:
            server.close()


class CheckedLocalProcessSpawner(SimpleLocalProcessSpawner):
    """JupyterHub's SimpleLocalProcessSpawner whose start() fails when the notebook
    process exits within ``settle`` seconds, as a Spawner that waits for its notebook
    does: a notebook command that fails makes a failed start (FAILED), not a READY one."""

    settle = Float(1.0, config=True, help="Seconds start() watches the new process before it returns.")

    async def start(self):
        address = await super().start()
        for _ in range(max(1, int(self.settle / 0.05))):
            status = self.proc.poll()  # not self.poll(): that forgets the pid
            if status is not None:
                raise RuntimeError(f"The notebook exited with status {status} while it started.")
            await asyncio.sleep(0.05)
        return address
