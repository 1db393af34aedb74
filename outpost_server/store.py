"""Persistence: what the Outpost needs to survive a restart.

SQLAlchemy 2 Core on asyncio; a SQLite file by default, PostgreSQL by URL. Two tables:
``servers`` (one row per (hub, server_name): the start's inputs, the Spawner's state, the
lifecycle state) and ``events`` (the progress events of each server's current start,
bounded per server).

Writes go through one writer task that commits everything queued since its last commit
in a single transaction (group commit): under load many RPCs share one commit, and no two
transactions ever contend for SQLite's single write lock.

A database that goes away fails writes, it does not hang them: on PostgreSQL every
connection attempt and statement is bounded by :attr:`Store.timeout`, a batch that failed
because the database was unreachable fails all its callers at once (Unavailable), and the
pool checks a connection before each use (``pool_pre_ping``), so the first write after an
outage gets a fresh one (tests/test_faults.py).

The schema is alembic's (migrations/): :meth:`Store.open` creates a new database at the
newest revision and refuses one at another (``jupyterhub-outpost upgrade-db``).

The secret columns (``env``, ``spawner_state``, ``auth_state``) are encrypted in Python by the op builders,
before a write is queued (the prebuilt statements stay as they are), and decrypted by
:meth:`Store.load` (crypto.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    bindparam,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from outpost_client.errors import PersistenceUnavailable

from . import metrics, migrations
from .crypto import Crypt, DecryptionError

log = logging.getLogger("outpost.store")

#: outpost_schema.version of the newest schema revision (migrations/versions/), which
#: the releases before alembic check. 2: the servers' flavor and flavor_spec columns,
#: end_time and stop_message (runtime.py); revision 0002. 3: auth_state; revision 0003
SCHEMA_VERSION = 3

metadata = MetaData()

servers = Table(
    "outpost_servers",
    metadata,
    Column("hub", String(255), primary_key=True),
    Column("server_name", String(255), primary_key=True),
    Column("start_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("user_info", JSON, nullable=False),
    Column("spawner_name", String(255), nullable=False, default=""),
    Column("env", JSON, nullable=False),
    Column("user_options", JSON, nullable=False),
    Column("config_overrides", JSON, nullable=False),
    Column("spawner_state", JSON, nullable=True),
    Column("scheme", String(8), nullable=True),
    Column("host", String(255), nullable=True),
    Column("port", Integer, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("failure_message", Text, nullable=False, default=""),
    Column("error_class", String(255), nullable=False, default=""),
    Column("start_time", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    # the flavor the start was admitted under ("": none), and what it keeps of it
    # (flavors.Flavor.record(): its Spawner config and runtime), so a reload never changes it
    Column("flavor", String(64), nullable=False, default="", server_default=""),
    Column("flavor_spec", JSON, nullable=True),
    # when the runtime ends (runtime.py), and why the Outpost stopped the server itself
    Column("end_time", DateTime(timezone=True), nullable=True),
    Column("stop_message", Text, nullable=True),
    # the user's auth_state the hub sent (encrypted like env; NULL: none, or the server
    # stopped); revision 0003
    Column("auth_state", JSON, nullable=True),
)

events = Table(
    "outpost_events",
    metadata,
    Column("hub", String(255), primary_key=True),
    Column("server_name", String(255), primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("start_id", String(128), nullable=False),
    Column("data", JSON, nullable=False),
)

schema_info = Table(
    "outpost_schema",
    metadata,
    Column("version", Integer, primary_key=True),
)

Op = Callable[[AsyncConnection], Awaitable[Any]]

# Statements are built once, with bound parameters: building them per write (and their
# SQLAlchemy cache keys) cost more than the SQLite write itself (benchmarks/README.md).
_SERVER_KEY = and_(servers.c.hub == bindparam("k_hub"), servers.c.server_name == bindparam("k_name"))
_EVENTS_KEY = and_(events.c.hub == bindparam("k_hub"), events.c.server_name == bindparam("k_name"))
INSERT_SERVER = insert(servers)
INSERT_EVENTS = insert(events)
UPDATE_SERVER = update(servers).where(_SERVER_KEY)  # SET columns come from the parameters
DELETE_SERVER = delete(servers).where(_SERVER_KEY)
DELETE_EVENTS = delete(events).where(_EVENTS_KEY)
# a Stop deletes only its own start: a newer start of the same name keeps its row
DELETE_SERVER_OF_START = delete(servers).where(_SERVER_KEY, servers.c.start_id == bindparam("k_start"))
DELETE_EVENTS_OF_START = delete(events).where(_EVENTS_KEY, events.c.start_id == bindparam("k_start"))
TRIM_EVENTS = delete(events).where(_EVENTS_KEY, events.c.sequence < bindparam("k_keep"))

# encrypted at rest (crypto.py): the notebook's API token is in env, the user's
# credentials in auth_state
SECRET_COLUMNS = ("env", "spawner_state", "auth_state")


def now() -> datetime:
    return datetime.now(timezone.utc)


def async_url(url: str) -> str:
    """Accept plain SQLAlchemy URLs and pick the asyncio driver for them."""
    parsed = make_url(url)
    driver = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}.get(
        parsed.drivername
    )
    if driver:
        parsed = parsed.set(drivername=driver)
    return parsed.render_as_string(hide_password=False)


def unreachable(error: BaseException) -> bool:
    """True if error says the database could not be reached or did not answer in time (as
    opposed to refusing one of the ops): retrying ops one by one would only wait again."""
    if isinstance(error, (OSError, asyncio.TimeoutError)):  # refused, reset, timed out
        return True
    return isinstance(error, DBAPIError) and (
        error.connection_invalidated or isinstance(error.orig, (OSError, asyncio.TimeoutError))
    )


class Store:
    """The database, opened once per Outpost process."""

    def __init__(
        self,
        url: str,
        *,
        max_events_per_server: int | None = None,
        crypt: Crypt | None = None,
        timeout: float | None = None,
    ):
        self.url = async_url(url)
        #: seconds a PostgreSQL connection attempt, one statement, or the wait for a pooled
        #: connection may take before the write fails (Unavailable); a frozen server or a
        #: black-holed network must not hang Starts and Stops until TCP gives up (hours).
        #: None: the drivers' own (the Outpost always sets c.Outpost.db_timeout)
        self.timeout = timeout
        #: events kept per server (None: all; the Outpost always sets one)
        self.max_events = max_events_per_server
        # None stores the secret columns in plain text (the Outpost application always
        # passes one; it refuses to start without a key)
        self.crypt = crypt
        self.engine: AsyncEngine | None = None
        self._queue: list[tuple[tuple[Op, ...], asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task | None = None

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    async def open(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5)
            if self.timeout is not None:
                kwargs.update(
                    pool_timeout=self.timeout,
                    connect_args={"timeout": self.timeout, "command_timeout": self.timeout},
                )
        self.engine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":

            @event.listens_for(self.engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_conn, _record):
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

        try:
            async with self.engine.begin() as conn:
                # a new database is created at the newest schema revision; an older or
                # newer one is refused (DatabaseSchemaError: upgrade-db upgrades it)
                await conn.run_sync(migrations.prepare)
        except Exception:
            await self.engine.dispose()
            raise
        self._writer_task = asyncio.create_task(self._writer(), name="outpost-db-writer")

    async def close(self) -> None:
        if self._writer_task is not None:
            # let queued writes finish, then stop the writer
            while self._queue:
                await asyncio.sleep(0.01)
            self._writer_task.cancel()
            try:
                await self._writer_task
            except asyncio.CancelledError:
                pass
            self._writer_task = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    # --- writes -------------------------------------------------------------------

    async def write(self, *ops: Op) -> None:
        """Run ops in one transaction (possibly shared with other callers' ops).

        Raises Unavailable when the database cannot commit them.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append((ops, future))
        self._wake.set()
        if not metrics.enabled:
            # shielded: once queued, the write happens; a cancelled caller must not make
            # memory and database disagree about whether it did
            await asyncio.shield(future)
            return
        started = time.perf_counter()
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            raise  # the caller left; the write goes on and is not its to count
        except Exception:
            metrics.DB_WRITE_ERROR.observe(time.perf_counter() - started)
            raise
        metrics.DB_WRITE_OK.observe(time.perf_counter() - started)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._commit([op for ops, _ in batch for op in ops])
            except Exception as e:
                if len(batch) == 1 or unreachable(e):
                    for _, future in batch:
                        self._fail(future, e)
                    continue
                # one bad op must not fail the others: retry each caller on its own
                for ops, future in batch:
                    try:
                        await self._commit(list(ops))
                    except Exception as e1:
                        self._fail(future, e1)
                    else:
                        if not future.done():
                            future.set_result(None)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _commit(self, ops: list[Op]) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        async with self.engine.begin() as conn:
            for op in ops:
                await op(conn)
        if metrics.enabled:
            metrics.DB_COMMIT_DURATION.observe(time.perf_counter() - started)

    @staticmethod
    def _fail(future: asyncio.Future, error: Exception) -> None:
        log.error("Database write failed: %s: %s", type(error).__name__, error)
        if metrics.enabled:
            metrics.DB_WRITE_FAILURES.labels(type(error).__name__).inc()
        if not future.done():
            future.set_exception(
                PersistenceUnavailable(
                    "The Outpost could not write to its database; try again shortly.",
                    metadata={"error_class": type(error).__name__},
                )
            )

    # --- operations (pure builders of ops) ------------------------------------------

    def _seal(self, values: dict[str, Any]) -> dict[str, Any]:
        """Encrypt the secret columns among values (in place; values is a fresh dict)."""
        if self.crypt is not None:
            for column in SECRET_COLUMNS:
                if column in values:
                    values[column] = self.crypt.encrypt(values[column])
        return values

    def op_replace_server(self, row: dict[str, Any]) -> Op:
        key = {"k_hub": row["hub"], "k_name": row["server_name"]}
        values = self._seal(dict(row, updated=now()))

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(DELETE_EVENTS, key)
            await conn.execute(DELETE_SERVER, key)
            await conn.execute(INSERT_SERVER, values)

        return op

    def op_insert_server(self, row: dict[str, Any]) -> Op:
        """Insert a server that has no row yet (the manager's memory mirrors the table)."""
        values = self._seal(dict(row, updated=now()))

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(INSERT_SERVER, values)

        return op

    def op_update_server(self, hub: str, server_name: str, **values: Any) -> Op:
        params = self._seal(dict(values, updated=now(), k_hub=hub, k_name=server_name))

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(UPDATE_SERVER, params)

        return op

    @staticmethod
    def op_delete_server(hub: str, server_name: str, start_id: str) -> Op:
        """Delete the server's row and events if they are still those of ``start_id``."""
        key = {"k_hub": hub, "k_name": server_name, "k_start": start_id}

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(DELETE_EVENTS_OF_START, key)
            await conn.execute(DELETE_SERVER_OF_START, key)

        return op

    def op_add_events(self, hub: str, server_name: str, rows: list[dict[str, Any]]) -> Op:
        """Insert events and drop the oldest beyond the per-server limit (the last one,
        which may be the start's terminal event, is always kept)."""
        last = max(r["sequence"] for r in rows)
        keep_from = 0 if self.max_events is None else last - max(1, self.max_events) + 1
        values = [dict(r, hub=hub, server_name=server_name) for r in rows]

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(INSERT_EVENTS, values)
            if keep_from > 1:
                await conn.execute(TRIM_EVENTS, {"k_hub": hub, "k_name": server_name, "k_keep": keep_from})

        return op

    # --- reads (start-up only) --------------------------------------------------------

    async def load(self) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[dict]]]:
        """All server rows (secret columns decrypted), and their events ordered by sequence.

        Each row also has ``crypt_error`` (why its secret columns could not be decrypted,
        which are then None; "" when they could) and ``crypt_stale`` (True when they are
        in plain text or under a key other than the first: worth writing again).
        """
        assert self.engine is not None
        async with self.engine.connect() as conn:
            rows = [self._open(dict(r._mapping)) for r in await conn.execute(select(servers))]
            evs: dict[tuple[str, str], list[dict]] = {}
            result = await conn.execute(
                select(events).order_by(events.c.hub, events.c.server_name, events.c.sequence)
            )
            for r in result:
                m = dict(r._mapping)
                evs.setdefault((m["hub"], m["server_name"]), []).append(m)
        return rows, evs

    def _open(self, row: dict[str, Any]) -> dict[str, Any]:
        row["crypt_error"], row["crypt_stale"] = "", False
        if self.crypt is None:
            return row
        try:
            opened = {column: self.crypt.decrypt(row[column]) for column in SECRET_COLUMNS}
        except DecryptionError as e:
            row["crypt_error"] = str(e)
            for column in SECRET_COLUMNS:
                row[column] = None
            return row
        for column, (value, stale) in opened.items():
            row[column] = value
            row["crypt_stale"] = row["crypt_stale"] or stale
        return row
