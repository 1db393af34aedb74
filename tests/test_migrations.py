"""Schema migrations (outpost_server/migrations/): a database of the previous release is
refused at start, upgraded by ``jupyterhub-outpost upgrade-db`` (SQLite backed up first)
and keeps its servers; a new database is created at the newest revision."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from outpost_client import OutpostClient, pb
from outpost_server import migrations, store
from outpost_server.migrations import SchemaOutdated, SchemaTooNew

from .harness.outpost import ROOT, one_line, outpost_config, outpost_env, run_outpost, running_outpost

pytestmark = pytest.mark.rpc

#: the last commit before flavors (issue 12): the previous release's schema (revision 0001)
PREVIOUS_RELEASE = "162c85e"

CONFIG = """
c.Outpost.spawner_class = "outpost_server.testing.SlowSpawner"
c.SlowSpawner.delay = 0.1
c.Outpost.db_url = {db_url!r}
"""


def previous_release(root: Path) -> Path:
    """The previous release's outpost_server and outpost_client, from git, under root."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_RELEASE, "outpost_server", "outpost_client"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the previous release's code needs this repository's git history ({e})")
    root.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


def start_previous_release(op, code: Path) -> None:
    """Run the previous release's Outpost (code) with op's config, port and log."""
    op.runs += 1
    with open(op.log, "a") as logf:
        logf.write(f"\n--- run {op.runs} (release {PREVIOUS_RELEASE}) ---\n")
        logf.flush()
        op.proc = subprocess.Popen(
            [sys.executable, "-c", "from outpost_server.app import main; main()",
             "-f", str(op.config), "--port", str(op.port)],  # fmt: skip
            cwd=code,
            env=dict(os.environ, PYTHONPATH=str(code)),  # that release's code only
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def revision_in(url: str) -> str | None:
    engine = create_async_engine(store.async_url(url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: MigrationContext.configure(c, opts={"version_table": migrations.VERSION_TABLE}).get_current_revision()
            )
    finally:
        await engine.dispose()


async def test_a_previous_release_database_is_refused_upgraded_and_keeps_its_servers(db_url, outpost_process, tmp_path):
    """The previous release's Outpost starts two servers; this one refuses its database with
    one line naming upgrade-db; upgrade-db upgrades it (a SQLite file backed up first);
    then the servers are still there and RUNNING, with their events."""
    code = previous_release(tmp_path / "previous")
    op = outpost_process(CONFIG.format(db_url=db_url))
    start_previous_release(op, code)
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        for name in ("amy", "ben"):
            r = await client.start(name, f"{name}-1", user_name=name, env={"JUPYTERHUB_TEST_K": name}, wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_RUNNING
        events_before = [(e.sequence, e.kind, e.message) async for e in client.events("amy")]
    assert not op.stop()
    assert await revision_in(db_url) is None  # no alembic in that release

    # refused, the database untouched
    out = run_outpost("-f", str(op.config), "--port", "0", "--allow-unauthenticated", env=outpost_env())
    line = one_line(out)
    assert line.startswith(f"jupyterhub-outpost: the database has schema revision 0001, this Outpost needs {migrations.head()}")
    assert f"jupyterhub-outpost upgrade-db -f {op.config}" in line
    assert await revision_in(db_url) is None

    if db_url.startswith("sqlite"):
        db_file = Path(db_url.removeprefix("sqlite:///"))
        db_file.chmod(0o600)
    # the secret columns stay as they are: upgrade-db needs no key
    keyless = {k: v for k, v in outpost_env().items() if k != "OUTPOST_CRYPT_KEY"}
    out = run_outpost("upgrade-db", "-f", str(op.config), env=keyless)
    assert out.returncode == 0, out.stderr
    assert f"from schema revision 0001 to {migrations.head()}" in out.stdout
    assert await revision_in(db_url) == migrations.head()
    if db_url.startswith("sqlite"):
        (backup,) = db_file.parent.glob(db_file.name + ".20*")
        assert f"Backed up {db_file} to {backup}" in out.stdout
        assert backup.stat().st_mode & 0o777 == 0o600  # the database's own mode
        with sqlite3.connect(backup) as old:  # the database as it was: release 0001's
            assert old.execute("SELECT count(*) FROM outpost_servers").fetchone() == (2,)
            assert "flavor" not in {row[1] for row in old.execute("PRAGMA table_info(outpost_servers)")}
    else:
        assert "no backup made" in out.stdout

    # upgrade-db again: nothing to do, no second backup
    again = run_outpost("upgrade-db", "-f", str(op.config), env=outpost_env())
    assert again.returncode == 0 and f"at schema revision {migrations.head()} already: nothing to do" in again.stdout

    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        for name in ("amy", "ben"):
            status = await client.poll(name)
            assert status.state == pb.SERVER_STATE_RUNNING, (name, status)
            assert status.flavor == "" and not status.HasField("end_time")
        assert [s.server_name for s in await client.list_servers()] == ["amy", "ben"]
        events_after = [(e.sequence, e.kind, e.message) async for e in client.events("amy")]
        assert events_after == events_before
        assert (await client.stop("amy", "amy-1")).outcome == pb.STOP_OUTCOME_STOPPED


async def test_a_new_database_is_created_at_head_and_starts_without_upgrade(tmp_path, db_url):
    cfg = outpost_config(tmp_path, "outpost_server.testing.InstantSpawner", db_url)
    async with running_outpost(cfg) as op:
        await op.client.start("amy", "a1", user_name="amy", wait_until_ready=True)
    assert await revision_in(db_url) == migrations.head() == "0003"
    async with running_outpost(cfg) as op:
        assert (await op.client.poll("amy")).state == pb.SERVER_STATE_RUNNING
    out = run_outpost("upgrade-db", "--db-url", db_url, env=outpost_env())
    assert out.returncode == 0 and "nothing to do" in out.stdout, out.stderr
    assert not list(tmp_path.glob("*.sqlite.20*"))  # no backup when nothing changes


async def test_a_database_from_before_alembic_is_recognised_and_upgraded(tmp_path, db_url):
    """What the Outpost between flavors and alembic wrote (schema 2, no version table):
    recognised as revision 0002, refused as outdated, upgraded by upgrade-db, served."""
    cfg = outpost_config(tmp_path, "outpost_server.testing.InstantSpawner", db_url)
    async with running_outpost(cfg) as op:
        await op.client.start("amy", "a1", user_name="amy", wait_until_ready=True)
    engine = create_async_engine(store.async_url(db_url), poolclass=NullPool)
    async with engine.begin() as conn:  # back to schema 2, as that Outpost left it
        await conn.run_sync(lambda c: command.downgrade(migrations.alembic_config(c), "0002"))
        await conn.execute(text(f"DROP TABLE {migrations.VERSION_TABLE}"))
    await engine.dispose()
    assert await revision_in(db_url) is None
    with pytest.raises(SchemaOutdated, match="schema revision 0002"):
        async with running_outpost(cfg):
            pass
    out = run_outpost("upgrade-db", "--db-url", db_url, env=outpost_env())
    assert out.returncode == 0 and f"from schema revision 0002 to {migrations.head()}" in out.stdout, out.stderr
    async with running_outpost(cfg) as op:
        assert (await op.client.poll("amy")).state == pb.SERVER_STATE_RUNNING
    assert await revision_in(db_url) == migrations.head()


async def test_a_database_of_a_newer_outpost_is_refused(tmp_path, db_url):
    cfg = outpost_config(tmp_path, "outpost_server.testing.InstantSpawner", db_url)
    async with running_outpost(cfg):
        pass
    engine = create_async_engine(store.async_url(db_url), poolclass=NullPool)
    async with engine.begin() as conn:
        await conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0099'"))
    await engine.dispose()
    with pytest.raises(SchemaTooNew, match="schema revision 0099, newer than this Outpost knows"):
        async with running_outpost(cfg):
            pass
    out = run_outpost("upgrade-db", "--db-url", db_url, env=outpost_env())
    assert "newer than this Outpost knows" in one_line(out)


async def test_an_older_database_is_refused_in_process_too(tmp_path, db_url):
    url = db_url
    engine = create_async_engine(store.async_url(url), poolclass=NullPool)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: _upgrade_to(c, "0001"))
    await engine.dispose()
    cfg = outpost_config(tmp_path, "outpost_server.testing.InstantSpawner", url)
    with pytest.raises(SchemaOutdated, match="upgrade-db"):
        async with running_outpost(cfg):
            pass


def test_upgrade_db_needs_a_database(tmp_path):
    out = run_outpost("upgrade-db", "--db-url", f"sqlite:///{tmp_path}/typo.sqlite", env=outpost_env())
    assert one_line(out) == f"jupyterhub-outpost upgrade-db: no database at {tmp_path}/typo.sqlite"
    assert not (tmp_path / "typo.sqlite").exists()


def _upgrade_to(sync_conn, revision: str) -> None:
    command.upgrade(migrations.alembic_config(sync_conn), revision)


async def test_the_revisions_build_the_tables_of_store_py(db_url):
    """Every revision from an empty database gives exactly the tables store.py declares
    (what a new database is created with), and outpost_schema.version = SCHEMA_VERSION."""
    engine = create_async_engine(store.async_url(db_url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: _upgrade_to(c, "head"))
        async with engine.connect() as conn:

            def diff(sync_conn):
                context = MigrationContext.configure(sync_conn, opts={"version_table": migrations.VERSION_TABLE})
                return compare_metadata(context, store.metadata)

            assert await conn.run_sync(diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert tables == set(store.metadata.tables) | {migrations.VERSION_TABLE}
            assert (await conn.execute(text("SELECT version FROM outpost_schema"))).scalar() == store.SCHEMA_VERSION
    finally:
        await engine.dispose()


async def test_the_newest_revision_downgrades_and_upgrades_again(db_url):
    """alembic's downgrade of each revision works (the way back for a developer; an
    operator restores the backup instead)."""
    engine = create_async_engine(store.async_url(db_url), poolclass=NullPool)

    def columns(sync_conn) -> set[str]:
        return {c["name"] for c in inspect(sync_conn).get_columns("outpost_servers")}

    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: _upgrade_to(c, "head"))
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(migrations.alembic_config(c), "0001"))
        async with engine.connect() as conn:
            assert "flavor" not in await conn.run_sync(columns)
            assert await conn.run_sync(migrations.revision_of) == ("0001", True)
            assert (await conn.execute(text("SELECT version FROM outpost_schema"))).scalar() == 1
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: _upgrade_to(c, "head"))
        async with engine.connect() as conn:
            assert {"flavor", "flavor_spec", "end_time", "stop_message", "auth_state"} <= await conn.run_sync(columns)
    finally:
        await engine.dispose()
