"""Fixtures of the Outpost test suite. The helpers they use, and the tests and benchmarks
use, are in tests/harness/ (see its ``__init__``).

Index:
- ``start_outpost`` (factory): a real Outpost *in this process* on 127.0.0.1:0 (the
  `Outpost` application's own init steps: database, lifecycle manager, grpc.aio server
  with health and reflection) plus a real `OutpostClient`; torn down after the test.
  Pass a Spawner class from ``outpost_server.testing`` (the zoo: Instant, Slow, Failing,
  NeverReady, FailingPoll, SlowPoll, HangingStart, Recording, LatePort, HangingStop,
  CheckedLocalProcess: real processes, a start that fails when they exit early) or a
  real one, and any `Outpost` traits. (``harness.outpost.running_outpost``)
- ``outpost``: ``start_outpost`` with the InstantSpawner and SQLite.
- ``outpost_process`` (factory): the `jupyterhub-outpost` console script as a real
  process with an ``outpost_config.py``; for signals, exits and restarts; stopped
  (SIGTERM) after the test. (``harness.outpost.OutpostProcess``)
- ``db_url``: parametrised over a SQLite file and a fresh PostgreSQL database on
  127.0.0.1:5432 (created per test, dropped afterwards).
- ``pg_url``: only the PostgreSQL database.
- ``pki`` (session): ``generate-certs`` output: a CA, an Outpost certificate for
  127.0.0.1 and client certificates for the hubs ``hub-a`` and ``hub-b``.
- ``subreaper``: makes this process the reaper of orphaned notebooks (this machine's
  PID 1 does not reap), for tests that SIGKILL an Outpost; reaps the pids added to
  ``subreaper.pids``.
- ``slurm``: a private single-node Slurm cluster (munged, slurmctld, slurmd; jobs run as
  root), all under one temp dir; ``slurm.conf`` is its config file (``slurm.env`` has
  ``SLURM_CONF``); ``occupy()``/``free()``, ``squeue()``,
  ``stop_controller()``/``start_controller()``; see tests/harness/slurm.py.
- ``sshd_server`` (factory): ``sshd_server(extra_config="", port=None)`` -> a private
  OpenSSH server, not yet started (tests/harness/sshd.py); stopped and removed after the
  test, which fails if one of its processes survived.
- ``make_site`` (factory): ``await make_site(name, **kw)`` -> a started
  ``harness.site.Site`` (an Outpost process with its SSH forwarder, by default
  SimpleLocalProcessSpawner running jupyterhub-singleuser); its notebooks are stopped and
  its client closed after the test.
- ``site``: ``make_site("site-a")``.
- ``hub_factory`` (factory): ``hub_factory(extra_config, name="hub", **kw)`` -> a
  ``harness.hub.JupyterHubProcess`` (a real JupyterHub with the real proxy), not yet
  started; it and its proxy are stopped after the test.
- ``_reset_spawner_class_state`` (autouse): puts the class-level state of the test
  Spawners (``outpost_server.testing.class_state``: counters, lists of calls) back as
  defined, before each test.
- ``_restore_outpost_logger`` (autouse): the ``outpost`` logger as it was before the test
  (an OutpostSpawner in this process sends it to its hub's log handlers,
  ``adopt_hub_logging``: later tests' ``caplog`` would not see it).

``TEST_CRYPT_KEY`` (harness.outpost) is the database encryption key of the whole session:
this module sets ``OUTPOST_CRYPT_KEY`` to it in ``os.environ`` when imported, so every
Outpost (in process, ``outpost_process``, any console script a test runs) has a key;
tests/test_crypto.py removes or replaces it where it needs to.

Every test belongs to exactly one layer, a marker its module sets (``pytestmark``):
``unit`` (pure functions, no sockets), ``rpc`` (a real Outpost, in process or as the
console script, and real clients; no sshd, hub, Slurm or network namespace) or ``e2e``
(real JupyterHub and proxy, sshd, Slurm, network namespaces). A module's layer is the
heaviest its tests need (a few pure-function tests sit in rpc modules, beside what they
check). Collection fails for a test with none or several of them. ``make test-fast``
runs ``(unit or rpc) and not slow and not postgres and not slurm``.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from outpost_server.certs import generate_certs
from outpost_server.testing import reset_class_state

from .harness.hub import JupyterHubProcess
from .harness.outpost import TEST_CRYPT_KEY, outpost_config, outpost_process_factory, running_outpost
from .harness.procs import Subreaper, process_alive
from .harness.site import Site
from .harness.slurm import private_cluster
from .harness.sshd import PrivateSSHD

# the Outpost refuses to start without a key for its database (outpost_server/crypto.py)
os.environ["OUTPOST_CRYPT_KEY"] = TEST_CRYPT_KEY

PG_ADMIN_URL = os.environ.get("OUTPOST_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

LAYERS = ("unit", "rpc", "e2e")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every collected test has exactly one layer marker (before ``-m`` deselects any)."""
    wrong = []
    for item in items:
        layers = {mark.name for mark in item.iter_markers() if mark.name in LAYERS}
        if len(layers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(sorted(layers)) or 'no layer'}")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one of the markers {', '.join(LAYERS)} "
            "(a module's pytestmark; see tests/conftest.py):\n  " + "\n  ".join(wrong)
        )


@pytest.fixture(autouse=True)
def _reset_spawner_class_state():
    reset_class_state()


@pytest.fixture(autouse=True)
def _restore_outpost_logger():
    import logging

    logger = logging.getLogger("outpost")
    saved = (list(logger.handlers), logger.level, logger.propagate, getattr(logger, "_outpost_adopted", False))
    yield
    logger.handlers, level, logger.propagate, logger._outpost_adopted = saved
    logger.setLevel(level)


# --- the Outpost ------------------------------------------------------------------------


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


@pytest.fixture
def outpost_process(tmp_path):
    """Factory: ``outpost_process(config_text, name="outpost")``; stopped (SIGTERM) after
    the test."""
    factory, made = outpost_process_factory(tmp_path)
    yield factory
    for op in made:
        op.stop()


# --- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
async def pg_url():
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    import asyncpg

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    name = f"outpost_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        await admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncio.TimeoutError) as e:
        pytest.fail(f"PostgreSQL on {PG_ADMIN_URL} is not reachable ({e}); `make postgres` starts it")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outpost.sqlite"
    return request.getfixturevalue("pg_url")


# --- certificates ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, an Outpost certificate for 127.0.0.1 and client certificates for hub-a and
    hub-b (generate-certs)."""
    return generate_certs(str(tmp_path_factory.mktemp("pki") / "certs"), ["127.0.0.1"], ["hub-a", "hub-b"])


# --- processes: orphans, Slurm, sshd --------------------------------------------------


@pytest.fixture
def subreaper():
    reaper = Subreaper()
    reaper.start()
    yield reaper
    reaper.stop()


@pytest.fixture
def slurm(subreaper):
    with private_cluster(subreaper) as cluster:
        yield cluster


@pytest.fixture
def sshd_server():
    """Factory: ``sshd_server(extra_config="", port=None)`` -> a new, not yet started
    PrivateSSHD::

        sshd = sshd_server()
        key = sshd.add_client_key("hub", options='restrict,port-forwarding,permitopen="127.0.0.1:8888"')
        sshd.start()
    """
    if os.geteuid() != 0:
        pytest.skip("a private sshd for another user needs root")
    made: list[PrivateSSHD] = []

    def factory(**kwargs) -> PrivateSSHD:
        sshd = PrivateSSHD(**kwargs)
        made.append(sshd)
        return sshd

    yield factory
    left = []
    for sshd in made:
        pids = [sshd.pid, *sshd.connection_pids()] if sshd.pid else []
        sshd.close()
        left += [pid for pid in pids if process_alive(pid)]
    assert not left, f"sshd processes left behind: {left}"


# --- sites and hubs ---------------------------------------------------------------------


@pytest.fixture
async def make_site(outpost_process, tmp_path):
    """Factory: ``await make_site(name, site_class=Site, **kw)`` -> a started site."""
    made: list[Site] = []

    async def factory(name: str, site_class: type[Site] = Site, **kw) -> Site:
        s = site_class(outpost_process, tmp_path, name, **kw)
        made.append(s)
        await s.start()
        return s

    yield factory
    for s in made:
        await s.stop_all()
        await s.close()


@pytest.fixture
async def site(make_site):
    return await make_site("site-a")


@pytest.fixture
def hub_factory(tmp_path):
    hubs: list[JupyterHubProcess] = []

    def factory(extra_config: str, name: str = "hub", **kw) -> JupyterHubProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        hub = JupyterHubProcess(workdir, extra_config, **kw)
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        hub.stop()
        hub.stop_proxy()
