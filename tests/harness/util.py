"""Small helpers of tests and benchmarks alike: ids, ports, waiting, event streams, percentiles,
the local account real notebooks run as."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid


def sid() -> str:
    """A fresh start_id."""
    return uuid.uuid4().hex


async def collect(client, name: str, into: list | None = None, *, timeout: float | None = 30, **kw) -> list:
    """The events of server ``name``'s start (``client.events``) until the stream ends.

    Each event is appended to ``into`` as it arrives (for a caller watching the stream from
    another task), and the list is returned. ``timeout`` bounds the whole stream (None: it
    ends by itself); ``kw`` goes to ``client.events`` (``start_id``, ``after_sequence``)."""
    events = [] if into is None else into
    async for event in client.events(name, timeout=timeout, **kw):
        events.append(event)
    return events


#: ports free_port() handed out in this process: the kernel may offer a port again as soon
#: as the probing socket closes, before whoever got it binds it (two ports of one Outpost
#: came out equal that way), so a port is handed out once per run
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, and not handed out before in
    this process."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no fresh free port on 127.0.0.1 in 1000 tries")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port (within a second)."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


async def wait_for(predicate, timeout: float = 10, interval: float = 0.05, message: str = ""):
    """Call predicate (a function, or one returning a coroutine) every ``interval`` seconds
    until it returns something true, and return that; AssertionError after ``timeout``."""
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


def percentile(samples, q: float) -> float:
    """The q-th percentile (0..100) of samples, by the nearest-rank method."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = -(-q * len(ordered) // 100)  # ceil, in exact arithmetic for an integer q
    return ordered[min(max(int(rank), 1), len(ordered)) - 1]


#: the local account the tests' real LocalProcessSpawner notebooks run as: root and system
#: accounts (nobody, daemon) are refused whatever the Spawner (outpost_server/accounts.py)
NOTEBOOK_ACCOUNT = "outpost-nb"


def notebook_account() -> str:
    """NOTEBOOK_ACCOUNT, created with useradd if missing (needs root, as switching users does)."""
    from .sshd import ensure_user

    ensure_user(NOTEBOOK_ACCOUNT)
    return NOTEBOOK_ACCOUNT


@contextlib.contextmanager
def captured_log(name: str):
    """The records of logger ``name`` while the block runs, at DEBUG and whatever its
    propagation (pytest's caplog sees only what reaches the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
