"""Encryption at rest: env (the notebook's API token) and the Spawner's state are stored
encrypted (MultiFernet), on SQLite and PostgreSQL; key rotation; plain rows from before
encryption; no key, a bad key, a wrong key; the demo's key file."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import uuid
from datetime import datetime, timezone

import pytest
from cryptography.fernet import Fernet
from jupyterhub.spawner import Spawner
from traitlets import Unicode

from outpost_client import pb
from outpost_server.app import Outpost
from outpost_server.crypto import MAKE_KEY, Crypt, CryptConfigError, DecryptionError
from outpost_server.store import Store

from .harness.outpost import (
    ROOT,
    TEST_CRYPT_KEY,
    one_line,
    outpost_config,
    run_outpost,
    running_outpost,
    sqlite_bytes,
)

pytestmark = pytest.mark.rpc


class StatefulSpawner(Spawner):
    """Keeps a secret in its state (as a real Spawner may: a pid, a job id, a token)."""

    secret = Unicode("")

    async def start(self):
        self.secret = self.get_env()["JUPYTERHUB_API_TOKEN"] + "-state"
        return ("127.0.0.1", 34567)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None

    def get_state(self):
        state = super().get_state()
        state["secret"] = self.secret
        return state

    def load_state(self, state):
        super().load_state(state)
        self.secret = state.get("secret", "")


def new_key() -> str:
    return Fernet.generate_key().decode()


def config(tmp_path, db_url, keys=None):
    traits = {} if keys is None else {"crypt_keys": keys}
    return outpost_config(tmp_path, StatefulSpawner, db_url, **traits)


def token() -> str:
    return f"secret-token-{uuid.uuid4().hex}"


async def start(op, name: str, api_token: str):
    r = await op.client.start(
        name, f"{name}-1", user_name=name, env={"JUPYTERHUB_API_TOKEN": api_token}, wait_until_ready=True
    )
    assert r.status.state == pb.SERVER_STATE_RUNNING, r.status.failure_message


async def raw_dump(db_url: str) -> bytes:
    """Everything stored, as bytes: the SQLite files (main file and WAL), or every
    PostgreSQL row of the Outpost's tables as text."""
    if db_url.startswith("sqlite:///"):
        return sqlite_bytes(db_url[len("sqlite:///"):])
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        out = []
        for table in ("outpost_servers", "outpost_events"):
            out += [r[0] for r in await conn.fetch(f"SELECT t::text FROM {table} t")]
        return "\n".join(out).encode()
    finally:
        await conn.close()


async def raw_rows(db_url: str) -> dict[str, dict]:
    """server_name -> the row as stored (no decryption; JSON columns parsed)."""
    if db_url.startswith("sqlite:///"):
        with sqlite3.connect(db_url[len("sqlite:///"):]) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM outpost_servers")]
    else:
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            rows = [dict(r) for r in await conn.fetch("SELECT * FROM outpost_servers")]
        finally:
            await conn.close()
    for r in rows:
        for column in ("env", "spawner_state"):
            if isinstance(r[column], str):
                r[column] = json.loads(r[column])
    return {r["server_name"]: r for r in rows}


def decrypt_with(key: str, stored: dict) -> dict:
    assert set(stored) == {"fernet"}, stored
    return json.loads(Fernet(key).decrypt(stored["fernet"].encode()))


# --- at rest, and back ---------------------------------------------------------------------


async def test_token_and_state_are_encrypted_and_restored(tmp_path, db_url):
    secret = token()
    cfg = config(tmp_path, db_url)
    async with running_outpost(cfg) as op:
        await start(op, "amy", secret)
        dump = await raw_dump(db_url)
        assert b"amy" in dump  # the dump does hold the row
        assert secret.encode() not in dump
    dump = await raw_dump(db_url)
    assert secret.encode() not in dump, "the token is stored in plain text"
    row = (await raw_rows(db_url))["amy"]
    assert decrypt_with(TEST_CRYPT_KEY, row["env"])["JUPYTERHUB_API_TOKEN"] == secret
    assert decrypt_with(TEST_CRYPT_KEY, row["spawner_state"])["secret"] == f"{secret}-state"

    async with running_outpost(cfg) as op:  # restart: restored and served
        status = await op.client.poll("amy")
        assert status.state == pb.SERVER_STATE_RUNNING
        rec = op.manager.records[("default", "amy")]
        assert rec.spec.env["JUPYTERHUB_API_TOKEN"] == secret
        assert rec.spawner.secret == f"{secret}-state"
        assert [s.server_name for s in await op.client.list_servers()] == ["amy"]
        assert (await op.client.stop("amy", "amy-1")).outcome == pb.STOP_OUTCOME_STOPPED
    assert await raw_rows(db_url) == {}


async def test_rotation_keeps_old_rows_readable_and_rewrites_them(tmp_path, db_url):
    old, new = new_key(), new_key()
    secret = token()
    async with running_outpost(config(tmp_path, db_url, [old])) as op:
        await start(op, "amy", secret)
    assert decrypt_with(old, (await raw_rows(db_url))["amy"]["env"])["JUPYTERHUB_API_TOKEN"] == secret

    async with running_outpost(config(tmp_path, db_url, [new, old])) as op:
        assert (await op.client.poll("amy")).state == pb.SERVER_STATE_RUNNING
        assert op.manager.records[("default", "amy")].spec.env["JUPYTERHUB_API_TOKEN"] == secret
        await start(op, "ben", token())  # new rows: the first key
    rows = await raw_rows(db_url)
    # the start-up rewrote amy's row under the first key
    for name in ("amy", "ben"):
        decrypt_with(new, rows[name]["env"])
        decrypt_with(new, rows[name]["spawner_state"])

    # so the old key can go now
    async with running_outpost(config(tmp_path, db_url, [new])) as op:
        assert (await op.client.poll("amy")).state == pb.SERVER_STATE_RUNNING
        assert op.manager.records[("default", "amy")].spawner.secret == f"{secret}-state"


async def test_wrong_key_marks_the_server_unknown_and_keeps_its_row(tmp_path, db_url):
    right, wrong = new_key(), new_key()
    async with running_outpost(config(tmp_path, db_url, [right])) as op:
        await start(op, "amy", token())
    stored = (await raw_rows(db_url))["amy"]

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("outpost.manager")
    logger.addHandler(handler)
    try:
        async with running_outpost(config(tmp_path, db_url, [wrong])) as op:
            status = await op.client.poll("amy")
            assert status.state == pb.SERVER_STATE_UNKNOWN
            assert op.manager.records[("default", "amy")].spawner is None
            await op.manager.poller.poll_all()  # the poller leaves it alone
            # the Outpost serves the others
            await start(op, "ben", token())
    finally:
        logger.removeHandler(handler)
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "default/amy" in errors[0] and "decrypt" in errors[0], errors
    # nothing overwrote the row: the right key still reads it
    assert (await raw_rows(db_url))["amy"]["env"] == stored["env"]
    async with running_outpost(config(tmp_path, db_url, [wrong, right])) as op:
        assert (await op.client.poll("amy")).state == pb.SERVER_STATE_RUNNING
        assert (await op.client.poll("ben")).state == pb.SERVER_STATE_RUNNING


async def test_plain_rows_from_before_encryption_are_read_and_encrypted(tmp_path, db_url):
    """A database written before encryption: read as it is, re-encrypted at start-up."""
    secret = token()
    store = Store(db_url)  # no crypt: plain text, as before
    await store.open()
    try:
        await store.write(
            store.op_insert_server(
                {
                    "hub": "default",
                    "server_name": "old",
                    "start_id": "o1",
                    "state": "stopped",
                    "user_info": {"name": "old"},
                    "spawner_name": "",
                    "env": {"JUPYTERHUB_API_TOKEN": secret},
                    "user_options": {},
                    "config_overrides": {},
                    "spawner_state": {"secret": secret},
                    "exit_code": 0,
                    "start_time": datetime.now(timezone.utc),
                }
            )
        )
    finally:
        await store.close()
    assert secret.encode() in await raw_dump(db_url)
    async with running_outpost(config(tmp_path, db_url)) as op:
        assert (await op.client.poll("old")).state == pb.SERVER_STATE_STOPPED
        assert op.manager.records[("default", "old")].spec.env == {"JUPYTERHUB_API_TOKEN": secret}
    row = (await raw_rows(db_url))["old"]
    assert decrypt_with(TEST_CRYPT_KEY, row["env"]) == {"JUPYTERHUB_API_TOKEN": secret}
    assert decrypt_with(TEST_CRYPT_KEY, row["spawner_state"]) == {"secret": secret}


# --- configuration ------------------------------------------------------------------------


def run_with_key(tmp_path, *args, env_key=None):
    """The console script on port 0 with OUTPOST_CRYPT_KEY left out of its env, or set to env_key."""
    env = {k: v for k, v in os.environ.items() if k != "OUTPOST_CRYPT_KEY"}
    if env_key is not None:
        env["OUTPOST_CRYPT_KEY"] = env_key
    return run_outpost("--port", "0", *args, cwd=tmp_path, env=env)


def test_no_key_refuses_to_start_with_one_line(tmp_path):
    line = one_line(run_with_key(tmp_path))
    assert line.startswith("jupyterhub-outpost: no encryption key for the database")
    assert "OUTPOST_CRYPT_KEY" in line and MAKE_KEY in line
    assert not (tmp_path / "outpost.sqlite").exists()


def test_bad_key_refuses_to_start_without_echoing_it(tmp_path):
    line = one_line(run_with_key(tmp_path, env_key=f"{new_key()};not-a-key-at-all"))
    assert "OUTPOST_CRYPT_KEY: key 2 is not a Fernet key" in line and "not-a-key-at-all" not in line
    assert not (tmp_path / "outpost.sqlite").exists()


async def test_no_key_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv("OUTPOST_CRYPT_KEY")
    with pytest.raises(CryptConfigError, match="no encryption key"):
        async with running_outpost(config(tmp_path, None)):
            pass
    # an explicit empty crypt_keys wins over the environment
    monkeypatch.setenv("OUTPOST_CRYPT_KEY", TEST_CRYPT_KEY)
    with pytest.raises(CryptConfigError, match="no encryption key"):
        async with running_outpost(config(tmp_path, None, [])):
            pass


async def test_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OUTPOST_CRYPT_KEY")
    old, new = new_key(), new_key()
    key_file = tmp_path / "crypt_key"
    key_file.write_text(f"# rotated 2025-01-01\n{new}\n{old}\n")
    key_file.chmod(0o600)
    cfg = outpost_config(tmp_path, StatefulSpawner, crypt_key_file=str(key_file))
    async with running_outpost(cfg) as op:
        await start(op, "amy", token())
    (row,) = (await raw_rows(cfg.Outpost.db_url)).values()
    decrypt_with(new, row["env"])

    app = Outpost(config=outpost_config(tmp_path, StatefulSpawner, crypt_key_file=str(tmp_path / "missing")))
    with pytest.raises(CryptConfigError, match="missing: No such file"):
        app.make_crypt()
    both = outpost_config(tmp_path, StatefulSpawner, crypt_key_file=str(key_file), crypt_keys=[new])
    with pytest.raises(CryptConfigError, match="not both"):
        Outpost(config=both).make_crypt()


def test_crypt_unit():
    old, new = new_key(), new_key()
    c_old, c_both = Crypt([old]), Crypt([new, old])
    stored = c_old.encrypt({"A": "b"})
    assert c_old.decrypt(stored) == ({"A": "b"}, False)
    assert c_both.decrypt(stored) == ({"A": "b"}, True)  # readable, stale
    assert c_both.decrypt(c_both.encrypt({"A": "b"})) == ({"A": "b"}, False)
    assert c_both.encrypt(None) is None and c_both.decrypt(None) == (None, False)
    assert c_both.decrypt({"A": "plain"}) == ({"A": "plain"}, True)
    with pytest.raises(DecryptionError):
        Crypt([new_key()]).decrypt(stored)


def test_demo_config_makes_a_private_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTPOST_DEMO_DATA", str(tmp_path))
    app = Outpost()
    app.load_config_file(str(ROOT / "demo" / "outpost_config.py"))
    key_file = tmp_path / "outpost_crypt_key"
    assert app.crypt_key_file == str(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    app.make_crypt()
    # a second load keeps the key
    Outpost().load_config_file(str(ROOT / "demo" / "outpost_config.py"))
    assert key_file.read_text() == key


# --- the key never reaches what the Outpost runs ---------------------------------------------


class InheritedEnvSpawner(Spawner):
    """start() runs a command the way batchspawner runs squeue and scancel (as the
    notebook's user, with the Outpost's own environment) and writes the names it saw."""

    out_file = Unicode(config=True, help="Where the names of the command's environment go.")

    async def start(self):
        import asyncio

        proc = await asyncio.create_subprocess_exec("/usr/bin/env", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        names = sorted(line.split("=", 1)[0] for line in out.decode().splitlines() if "=" in line)
        with open(self.out_file, "w") as f:
            f.write("\n".join(names))
        return ("127.0.0.1", 1)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


async def test_the_database_key_never_reaches_a_hosted_spawners_commands(tmp_path, outpost_process):
    """The console script reads OUTPOST_CRYPT_KEY, then removes it from its environment:
    a command a Spawner runs with the Outpost's environment does not see it (it sees PATH,
    so the probe works), and the Outpost still reads and writes its database, also after
    a restart (which reads the key from its own environment again)."""
    from outpost_client import OutpostClient

    seen = tmp_path / "env-names.txt"
    op = outpost_process(
        'c.Outpost.spawner_class = "tests.test_crypto.InheritedEnvSpawner"\n'
        f"c.InheritedEnvSpawner.out_file = {str(seen)!r}\n"
    )
    assert op.env.get("OUTPOST_CRYPT_KEY") or os.environ.get("OUTPOST_CRYPT_KEY")  # it is given one
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        status = (await client.start("probe", "p1", user_name="u", env={"JUPYTERHUB_API_TOKEN": "t"},
                                     wait_until_ready=True)).status  # fmt: skip
        assert status.state == pb.SERVER_STATE_RUNNING
    names = seen.read_text().split()
    assert "PATH" in names and "OUTPOST_CRYPT_KEY" not in names, names
    op.stop()
    seen.unlink()
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        assert (await client.poll("probe")).state == pb.SERVER_STATE_RUNNING  # decrypted its row
