"""Fixtures of the Outpost test suite.

Index:
- ``start_outpost`` (factory): a real Outpost *in this process* on 127.0.0.1:0 (the
  `Outpost` application's own init steps: database, lifecycle manager, grpc.aio server
  with health and reflection) plus a real `OutpostClient`; torn down after the test.
  Pass a Spawner class from ``outpost_server.testing`` (the zoo: Instant, Slow, Failing,
  NeverReady, FailingPoll, SlowPoll, HangingStart, Recording, LatePort) or a real one,
  and any `Outpost` traits.
- ``outpost``: ``start_outpost`` with the InstantSpawner and SQLite.
- ``outpost_process`` (factory): the `jupyterhub-outpost` console script as a real
  process with an ``outpost_config.py``; for signals, exits and restarts.
- ``db_url``: parametrised over a SQLite file and a fresh PostgreSQL database on
  127.0.0.1:5432 (created per test, dropped afterwards).
- ``pg_url``: only the PostgreSQL database.
- ``subreaper``: makes this process the reaper of orphaned notebooks (this machine's
  PID 1 does not reap), for tests that SIGKILL an Outpost.
- ``slurm``: a private single-node Slurm cluster (munged, slurmctld, slurmd; jobs run as
  root), all under one temp dir; ``slurm.conf`` is its config file (``slurm.env`` has
  ``SLURM_CONF``); ``occupy()``/``free()``, ``squeue()``,
  ``stop_controller()``/``start_controller()``; see tests/slurm.py.
- ``_reset_spawner_class_state`` (autouse): puts the class-level state of the test
  Spawners (``outpost_server.testing.class_state``: counters, lists of calls) back as
  defined, before each test.
- ``TEST_CRYPT_KEY``: the database encryption key of the whole session. This module sets
  ``OUTPOST_CRYPT_KEY`` to it in ``os.environ`` when imported, so every Outpost (in
  process, ``outpost_process``, any console script a test runs) has a key;
  tests/test_crypto.py removes or replaces it where it needs to.
"""

from __future__ import annotations

import os

# before anything imports grpc (see outpost_server/__init__.py)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# the Outpost refuses to start without a key for its database (outpost_server/crypto.py)
TEST_CRYPT_KEY = "-PrBvKhHEqnmnxFZTNRoyapLYoEPeFwCNomahDhSL5A="
os.environ["OUTPOST_CRYPT_KEY"] = TEST_CRYPT_KEY

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from traitlets.config import Config

from outpost_client import OutpostClient
from outpost_server.app import Outpost
from outpost_server.testing import reset_class_state

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("OUTPOST_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _reset_spawner_class_state():
    reset_class_state()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessOutpost:
    def __init__(self, app: Outpost, client: OutpostClient):
        self.app = app
        self.client = client
        self.manager = app.manager
        self.port = app.bound_port
        self.address = f"127.0.0.1:{app.bound_port}"


@asynccontextmanager
async def running_outpost(config: Config):
    app = Outpost(config=config)
    await app.setup()
    try:
        client = OutpostClient(f"127.0.0.1:{app.bound_port}", timeout=20)
        try:
            yield InProcessOutpost(app, client)
        finally:
            await client.close()
    finally:
        await app.cleanup()


async def stored_rows(app: Outpost) -> list[dict]:
    """The server rows in app's database, read through a Store of their own (app may be
    torn down already)."""
    from outpost_server.store import Store

    store = Store(app.db_url, crypt=app.crypt)
    await store.open()
    try:
        rows, _ = await store.load()
    finally:
        await store.close()
    return rows


def outpost_config(tmp_path: Path, spawner_class, db_url: str | None = None, **traits) -> Config:
    cfg = Config()
    cfg.Outpost.port = 0
    cfg.Outpost.spawner_class = spawner_class
    cfg.Outpost.db_url = db_url or f"sqlite:///{tmp_path}/outpost-{uuid.uuid4().hex[:8]}.sqlite"
    cfg.Outpost.shutdown_grace = 1.0
    cfg.Outpost.certs_dir = str(tmp_path / "outpost-certs")  # not the shared /tmp default
    for key, value in traits.items():
        if "." in key:
            section, name = key.split(".", 1)
            cfg[section][name] = value
        else:
            cfg.Outpost[key] = value
    return cfg


@pytest.fixture
async def start_outpost(tmp_path):
    """Factory: ``async with start_outpost(SpawnerClass, **traits) as op``."""

    def factory(spawner_class="outpost_server.testing.InstantSpawner", **traits):
        return running_outpost(outpost_config(tmp_path, spawner_class, **traits))

    return factory


@pytest.fixture
async def outpost(start_outpost):
    async with start_outpost() as op:
        yield op


# --- PostgreSQL -----------------------------------------------------------------------


async def _pg_admin(statement: str) -> None:
    import asyncpg

    dsn = PG_ADMIN_URL
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def pg_url():
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    name = f"outpost_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        await _pg_admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncio.TimeoutError) as e:
        pytest.fail(f"PostgreSQL on {PG_ADMIN_URL} is not reachable ({e}); `make postgres` starts it")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outpost.sqlite"
    return request.getfixturevalue("pg_url")


# --- the Outpost as a process ------------------------------------------------------------


class OutpostProcess:
    """The console script with a config file; start, signal, restart."""

    def __init__(self, workdir: Path, config_text: str):
        self.workdir = workdir
        self.config = workdir / "outpost_config.py"
        self.config.write_text(config_text)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "outpost.log"
        self.runs = 0
        self.netns: str | None = None  # run inside this network namespace

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        self.runs += 1
        logf = open(self.log, "a")
        logf.write(f"\n--- run {self.runs} ---\n")
        logf.flush()
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, str(BIN / "jupyterhub-outpost"), "-f", str(self.config), "--port", str(self.port), *extra],
            cwd=self.workdir,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()

    async def wait_serving(self, timeout: float = 30) -> None:
        """Until the health service answers SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"Outpost exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"Outpost not serving after {timeout}s:\n{self.log.read_text()[-3000:]}")
                await asyncio.sleep(0.1)

    async def wait_log(self, text: str, timeout: float = 30) -> None:
        """Until the current run's log contains text (for namespaces, where no socket
        from this process may reach the Outpost)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.log.read_text().rsplit(f"--- run {self.runs} ---", 1)[-1]
            if text in run:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"Outpost exited with {self.proc.returncode}:\n{run[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged after {timeout}s:\n{run[-3000:]}")
            await asyncio.sleep(0.1)

    def kill(self, sig=signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def outpost_process_factory(root: Path):
    """(factory, made): ``factory(config_text, name)`` makes an OutpostProcess in root/name
    (not started); ``made`` lists them, for the caller to stop."""
    made: list[OutpostProcess] = []

    def factory(config_text: str, name: str = "outpost") -> OutpostProcess:
        workdir = root / name
        workdir.mkdir()
        op = OutpostProcess(workdir, config_text)
        made.append(op)
        return op

    return factory, made


@pytest.fixture
def outpost_process(tmp_path):
    """Factory: ``outpost_process(config_text)``; stopped (SIGTERM) after the test."""
    factory, made = outpost_process_factory(tmp_path)
    yield factory
    for op in made:
        op.stop()


# --- orphans ----------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


class Subreaper:
    """Orphaned notebooks reparent to this process; reap the pids we are told about."""

    def __init__(self):
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            for pid in list(self.pids):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue  # not our child (yet)
                if done:
                    self.pids.discard(pid)


@pytest.fixture
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    reaper = Subreaper()
    reaper._thread.start()
    yield reaper
    reaper._stop.set()
    reaper._thread.join()
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def slurm(subreaper):
    from .slurm import private_cluster

    with private_cluster(subreaper) as cluster:
        yield cluster


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def process_alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def wait_for(predicate, timeout: float = 10, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
