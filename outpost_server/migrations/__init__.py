"""Schema migrations of the Outpost's database (alembic), like JupyterHub's ``alembic/``.

The revisions are in ``versions/``: ``0001`` is the schema of the releases before flavors
(the baseline), each later one changes it. The Outpost itself never changes the schema
of a database that has tables: at start-up (:func:`prepare`, from ``Store.open``)

- a database without the Outpost's tables is created at the newest revision (head) and
  stamped with it;
- a database at head is used as it is;
- an older one is refused (:class:`SchemaOutdated`, naming ``jupyterhub-outpost
  upgrade-db``) and a newer one too (:class:`SchemaTooNew`): the operator upgrades it
  with ``upgrade-db`` (:func:`upgrade`), which backs a SQLite file up first (app.py).

Databases written before alembic have no version table: their revision is read from the
``outpost_schema`` table those releases kept (:func:`legacy_revision`), and they are
stamped with it (at start-up when that is head, by ``upgrade-db`` otherwise).

``outpost_schema.version`` stays: releases before alembic refuse a database whose
version is newer than theirs, so every revision sets it one higher (``SCHEMA_VERSION``
in store.py is the head's).

The version table is ``outpost_alembic_version``, not alembic's default: the Outpost's
tables may share a PostgreSQL database with a JupyterHub, which has its own
``alembic_version``.

To write a revision: change the tables in store.py, then
``alembic -c outpost_server/migrations/alembic.ini revision -m "what changes"``
(on a database at head, ``--autogenerate`` drafts it), name it ``NNNN_what.py`` with
revision id ``NNNN``, and let tests/test_migrations.py compare the result with store.py.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

log = logging.getLogger("outpost.store")

VERSION_TABLE = "outpost_alembic_version"
HERE = Path(__file__).resolve().parent
#: outpost_schema.version of the releases before alembic, and the revision it means
LEGACY_REVISIONS = {1: "0001", 2: "0002"}
UPGRADE_COMMAND = "jupyterhub-outpost upgrade-db"


class DatabaseSchemaError(Exception):
    """The database's schema is not this Outpost's: a one-line message for the operator."""


class SchemaOutdated(DatabaseSchemaError):
    """The database is at an older revision than this Outpost's (upgrade-db upgrades it)."""

    def __init__(self, current: str, head: str, config_file: str | None = None):
        self.current, self.head = current, head
        super().__init__(self.message(config_file))

    def message(self, config_file: str | None = None) -> str:
        config = f" -f {config_file}" if config_file else " (-f with the Outpost's config file)"
        return (
            f"the database has schema revision {self.current}, this Outpost needs {self.head}: "
            f"stop every Outpost using it, then run `{UPGRADE_COMMAND}{config}` "
            "(it backs up a SQLite file first; back up PostgreSQL yourself)"
        )


class SchemaTooNew(DatabaseSchemaError):
    """The database was upgraded by a newer Outpost (its revision is unknown here)."""

    def __init__(self, current: str, head: str):
        self.current, self.head = current, head
        super().__init__(
            f"the database has schema revision {current}, newer than this Outpost knows ({head}): "
            "run the newer Outpost, or restore the backup made before its upgrade"
        )


def alembic_config(connection=None) -> Config:
    """alembic's Config for these revisions; ``connection`` (synchronous, SQLAlchemy) is
    the one env.py runs them on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    return scripts().get_current_head()


def _context(sync_conn) -> MigrationContext:
    return MigrationContext.configure(sync_conn, opts={"version_table": VERSION_TABLE})


def legacy_revision(sync_conn) -> str:
    """The revision of a database written before alembic (it has the Outpost's tables but
    no version table): the one its ``outpost_schema`` version names, or, without one,
    the newest whose columns it has."""
    version = None
    if inspect(sync_conn).has_table("outpost_schema"):
        version = sync_conn.execute(text("SELECT max(version) FROM outpost_schema")).scalar()
    if version is not None and version not in LEGACY_REVISIONS:  # never written before alembic
        raise SchemaTooNew(f"outpost_schema version {version}", head())
    columns = {c["name"] for c in inspect(sync_conn).get_columns("outpost_servers")}
    if version == 2 and not {"flavor", "flavor_spec", "end_time", "stop_message"} <= columns:
        return "0001"  # a development version between flavors and runtime limits (0002 completes it)
    if version is None:
        return "0002" if "end_time" in columns else "0001"
    return LEGACY_REVISIONS[version]


def revision_of(sync_conn) -> tuple[str | None, bool]:
    """(the database's revision, whether it is stored in the version table); (None, False)
    for a database without the Outpost's tables."""
    stored = _context(sync_conn).get_current_revision()
    if stored is not None:
        return stored, True
    if not inspect(sync_conn).has_table("outpost_servers"):
        return None, False
    return legacy_revision(sync_conn), False


def check_known(revision: str) -> None:
    try:
        scripts().get_revision(revision)
    except Exception:
        raise SchemaTooNew(revision, head()) from None


def prepare(sync_conn) -> str:
    """At Outpost start-up: create a new database at head, accept one at head (stamping a
    database from before alembic), refuse any other (DatabaseSchemaError). What it did:
    "created", "stamped" or "current"."""
    from ..store import SCHEMA_VERSION, metadata, schema_info

    current, stored = revision_of(sync_conn)
    if current is None:
        metadata.create_all(sync_conn)
        sync_conn.execute(schema_info.delete())
        sync_conn.execute(schema_info.insert().values(version=SCHEMA_VERSION))
        _context(sync_conn).stamp(scripts(), "head")
        log.info("Created the database tables at schema revision %s", head())
        return "created"
    if current == head():
        if stored:
            return "current"
        _context(sync_conn).stamp(scripts(), "head")
        log.info("Database from before schema revisions recognised as revision %s and stamped", current)
        return "stamped"
    check_known(current)
    raise SchemaOutdated(current, head())


def upgrade(sync_conn) -> tuple[str, str]:
    """Upgrade the database to head (stamping a database from before alembic with its
    revision first); (revision before, revision after). DatabaseSchemaError for a
    database newer than this Outpost, LookupError for one without the Outpost's tables."""
    current, stored = revision_of(sync_conn)
    if current is None:
        raise LookupError("it has no Outpost tables (the Outpost creates them when it first starts)")
    check_known(current)
    if current == head():
        if not stored:
            _context(sync_conn).stamp(scripts(), "head")
        return current, current
    if not stored:
        _context(sync_conn).stamp(scripts(), current)
        log.info("Database from before schema revisions recognised as revision %s", current)
    command.upgrade(alembic_config(sync_conn), "head")
    return current, head()


def backup_sqlite(path: str) -> str:
    """Copy the SQLite database at path to ``path.YYYY-mm-dd-HHMMSS`` (a suffix if that
    exists), with its permissions; the copy's path.

    Through SQLite's backup API, not a file copy: the Outpost runs SQLite in WAL mode, and
    what an Outpost that did not stop cleanly committed may still be in the -wal file."""
    import os
    import sqlite3
    import stat
    from datetime import datetime

    stamp = datetime.now().strftime("%Y-%m-%d-%H%M%S")
    target = f"{path}.{stamp}"
    for i in range(1, 100):
        if not os.path.exists(target):
            break
        target = f"{path}.{stamp}.{i}"
    else:
        raise FileExistsError(f"backups of {path} from {stamp} exist already")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(os.stat(path).st_mode))
    os.close(fd)
    source, copy = sqlite3.connect(path), sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    return target


async def upgrade_database(url: str, say=print) -> tuple[str, str]:
    """What ``jupyterhub-outpost upgrade-db`` does: upgrade the database at url to head,
    backing up a SQLite file first if it is not at head; (revision before, after).

    DatabaseSchemaError or LookupError (one-line messages) if it cannot."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from ..store import async_url

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if sqlite_file and not Path(parsed.database).is_file():
        raise LookupError(f"no database at {parsed.database}")
    engine = create_async_engine(async_url(url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            current, _ = await conn.run_sync(revision_of)
        if current is None:
            raise LookupError(f"{shown} has no Outpost tables (the Outpost creates them when it first starts)")
        check_known(current)
        if current != head():
            if sqlite_file:
                say(f"Backed up {parsed.database} to {backup_sqlite(parsed.database)}")
            else:
                say(f"Upgrading {shown}: no backup made (make your own of a PostgreSQL database first)")
        async with engine.begin() as conn:
            before, after = await conn.run_sync(upgrade)
    finally:
        await engine.dispose()
    if before == after:
        say(f"The database {shown} is at schema revision {after} already: nothing to do")
    else:
        say(f"Upgraded the database {shown} from schema revision {before} to {after}")
    return before, after
