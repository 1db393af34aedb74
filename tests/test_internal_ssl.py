"""internal_ssl: the hub's per-server certificates travel in Start, the Outpost writes them
(private files), hands them to the hosted Spawner's move_certs() and removes them at stop
and at a failed start; they never reach the Outpost's database.

The tests use a real in-process Outpost with a recording Spawner; a real JupyterHub with
internal_ssl, the real proxy and a real notebook through the SSH tunnel is
tests/test_e2e_hub.py's test_internal_ssl_end_to_end.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from jupyterhub.spawner import Spawner
from traitlets import Bool

from outpost_client import pb
from outpost_server.hosting import CERT_FILES, certs_location, default_certs_base
from outpost_server.testing import class_state

from .harness.hub import make_spawner
from .harness.outpost import ROOT, outpost_config, running_outpost, sqlite_bytes
from .harness.util import wait_for

pytestmark = pytest.mark.rpc

KEY = "-----BEGIN PRIVATE KEY-----\nkey-of-the-notebook\n-----END PRIVATE KEY-----\n"
CERT = "-----BEGIN CERTIFICATE-----\ncert-of-the-notebook\n-----END CERTIFICATE-----\n"
CA = "-----BEGIN CERTIFICATE-----\nnotebooks-ca-trust-bundle\n-----END CERTIFICATE-----\n"
PEMS = {"key_pem": KEY, "cert_pem": CERT, "ca_pem": CA}
HUB_ENV = {
    "JUPYTERHUB_API_TOKEN": "secret-token",
    "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
    # the hub's own paths (an old client might send them): never used at the site
    "JUPYTERHUB_SSL_KEYFILE": "/srv/hub/internal-ssl/user-alice/user-alice.key",
}


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@class_state("calls", "block_users")
class CertSpawner(Spawner):
    """Records what it gets: move_certs() paths (and the files' modes and contents),
    cert_paths, internal_ssl and the env at start()."""

    calls: list[dict] = []
    block_users: set[str] = set()

    async_move = Bool(False, config=True)
    rename = Bool(True, config=True, help="move_certs returns other paths (as if it moved them)")
    fail_move = Bool(False, config=True)
    fail_start = Bool(False, config=True)
    block = Bool(False, config=True)

    def _move(self, paths):
        directory = Path(paths["keyfile"]).parent
        self.calls.append(
            {
                "move_certs": dict(paths),
                "dir_mode": mode(directory),
                "modes": {k: mode(p) for k, p in paths.items()},
                "contents": {k: Path(p).read_text() for k, p in paths.items()},
            }
        )
        if self.fail_move:
            raise RuntimeError("no room for certificates")
        if self.rename:
            return {k: f"/site/moved/{Path(p).name}" for k, p in paths.items()}
        return paths

    def move_certs(self, paths):
        if self.async_move:

            async def later():
                await asyncio.sleep(0)
                return self._move(paths)

            return later()
        return self._move(paths)

    async def start(self):
        env = self.get_env()
        self.calls.append({"start": True, "internal_ssl": self.internal_ssl, "cert_paths": dict(self.cert_paths), "env": env})
        if self.fail_start:
            raise RuntimeError("the site is full")
        if self.block or self.user.name in self.block_users:
            await asyncio.Event().wait()
        return ("127.0.0.1", 12345)

    async def poll(self):
        return None

    async def stop(self, now=False):
        return None


def _start_call() -> dict:
    return next(c for c in CertSpawner.calls if c.get("start"))


def _move_call() -> dict:
    return next(c for c in CertSpawner.calls if "move_certs" in c)


async def _stored_text(op) -> str:
    """Every stored row and event of the Outpost, decrypted, as text."""
    rows, events = await op.manager.store.load()
    return json.dumps([rows, {str(k): v for k, v in events.items()}], default=str)


@pytest.mark.parametrize("async_move", [False, True], ids=["sync-move_certs", "async-move_certs"])
async def test_certificates_written_moved_and_removed(start_outpost, tmp_path, async_move):
    async with start_outpost(CertSpawner, **{"CertSpawner.async_move": async_move}) as op:
        start_id = uuid.uuid4().hex
        await op.client.start(
            "alice", start_id, user_name="alice", env=HUB_ENV, internal_ssl=PEMS, wait_until_ready=True
        )
        base, name = certs_location("default", "alice", start_id, op.app.certs_dir)
        directory = base / name

        moved = _move_call()
        # the three PEMs, as files of their own in a private directory
        assert moved["contents"] == {"keyfile": KEY, "certfile": CERT, "cafile": CA}
        assert {Path(p).parent for p in moved["move_certs"].values()} == {directory}
        assert moved["dir_mode"] == 0o700 and mode(base) == 0o700
        assert moved["modes"]["keyfile"] == 0o600
        assert all(m & 0o077 == 0 for m in moved["modes"].values())
        assert directory.is_dir()

        started = _start_call()
        assert started["internal_ssl"] is True
        expected = {k: f"/site/moved/{Path(p).name}" for k, p in moved["move_certs"].items()}
        assert started["cert_paths"] == expected  # move_certs' answer, not the Outpost's paths
        env = started["env"]
        assert env["JUPYTERHUB_SSL_KEYFILE"] == expected["keyfile"]
        assert env["JUPYTERHUB_SSL_CERTFILE"] == expected["certfile"]
        assert env["JUPYTERHUB_SSL_CLIENT_CA"] == expected["cafile"]
        assert env["JUPYTERHUB_SERVICE_URL"].startswith("https://")

        status = await op.client.poll("alice")
        assert status.state == pb.SERVER_STATE_RUNNING
        assert status.address.scheme == "https"

        # never persisted, never kept in memory once on disk
        rec = op.manager.records[("default", "alice")]
        assert "BEGIN" not in json.dumps(rec.to_row(), default=str)
        assert not rec.spec.certificates
        assert "BEGIN" not in await _stored_text(op)
        db_file = Path(op.app.db_url.split("sqlite:///", 1)[1])
        assert b"BEGIN" not in sqlite_bytes(db_file)

        await op.client.stop("alice", start_id)
        assert not directory.exists(), "the Outpost's files must go with the server"


async def test_no_certificates_no_files(start_outpost, tmp_path):
    async with start_outpost(CertSpawner) as op:
        await op.client.start("bob", uuid.uuid4().hex, user_name="bob", env=HUB_ENV, wait_until_ready=True)
        started = _start_call()
        assert started["internal_ssl"] is False and not started["cert_paths"]
        assert "JUPYTERHUB_SSL_KEYFILE" not in started["env"]  # the hub's path is not passed on
        assert (await op.client.poll("bob")).address.scheme == "http"
        assert not any("move_certs" in c for c in CertSpawner.calls)
        assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("failure", ["fail_start", "fail_move"])
async def test_failed_start_removes_files(start_outpost, tmp_path, failure):
    async with start_outpost(CertSpawner, **{f"CertSpawner.{failure}": True}) as op:
        start_id = uuid.uuid4().hex
        r = await op.client.start(
            "carol", start_id, user_name="carol", env=HUB_ENV, internal_ssl=PEMS, wait_until_ready=True
        )
        assert r.status.state == pb.SERVER_STATE_STOPPED
        message = {"fail_start": "the site is full", "fail_move": "no room for certificates"}[failure]
        assert message in r.status.failure_message
        base, name = certs_location("default", "carol", start_id, op.app.certs_dir)
        assert Path(_move_call()["move_certs"]["keyfile"]).parent == base / name
        assert not (base / name).exists()
        assert base.is_dir() and not list(base.iterdir())


async def test_stop_during_start_removes_files(start_outpost, tmp_path):
    async with start_outpost(CertSpawner, **{"CertSpawner.block": True}) as op:
        start_id = uuid.uuid4().hex
        await op.client.start("dana", start_id, user_name="dana", env=HUB_ENV, internal_ssl=PEMS)
        base, name = certs_location("default", "dana", start_id, op.app.certs_dir)
        await wait_for(lambda: any(c.get("start") for c in CertSpawner.calls), message="never started")
        assert (base / name).is_dir()
        await op.client.stop("dana", start_id)
        assert not (base / name).exists()


async def test_files_removed_after_outpost_restart(tmp_path):
    """A restarted Outpost knows no certificates (they are not stored), yet removes the
    files of its servers: at Stop of a running one, at once for an interrupted start."""
    db_url = f"sqlite:///{tmp_path}/outpost.sqlite"
    certs_base = str(tmp_path / "certs")
    running_id, starting_id = uuid.uuid4().hex, uuid.uuid4().hex
    CertSpawner.block_users = {"fred"}  # fred's start never finishes
    async with running_outpost(outpost_config(tmp_path, CertSpawner, db_url=db_url, certs_dir=certs_base)) as op:
        await op.client.start("erin", running_id, user_name="erin", env=HUB_ENV, internal_ssl=PEMS, wait_until_ready=True)
        await op.client.start("fred", starting_id, user_name="fred", env=HUB_ENV, internal_ssl=PEMS)
        await wait_for(lambda: sum(1 for c in CertSpawner.calls if c.get("start")) == 2, message="fred never started")
    running_dir = Path(*certs_location("default", "erin", running_id, certs_base))
    starting_dir = Path(*certs_location("default", "fred", starting_id, certs_base))
    assert running_dir.is_dir() and starting_dir.is_dir()  # a shutdown keeps servers running

    async with running_outpost(outpost_config(tmp_path, CertSpawner, db_url=db_url, certs_dir=certs_base)) as op:
        # interrupted start: failed, cleaned up in the background (restore.py)
        await wait_for(
            lambda: _state(op.client, "fred", pb.SERVER_STATE_STOPPED), message="fred's start never failed"
        )
        assert not starting_dir.exists()
        assert running_dir.is_dir()
        assert (await op.client.poll("erin")).state == pb.SERVER_STATE_RUNNING
        await op.client.stop("erin", running_id)
        assert not running_dir.exists()


async def _state(client, name: str, state: int) -> bool:
    return (await client.poll(name)).state == state


async def test_outpost_spawner_sends_certificates(start_outpost, tmp_path):
    """Hub side: JupyterHub calls create_certs, then move_certs(paths), then start()."""
    hub_dir = tmp_path / "hub-internal-ssl"
    hub_dir.mkdir()
    paths = {}
    for pem_key, (path_key, file_name) in CERT_FILES.items():
        paths[path_key] = str(hub_dir / file_name)
        Path(paths[path_key]).write_text(PEMS[pem_key])
    async with start_outpost(CertSpawner) as op:
        spawner = make_spawner(op, internal_ssl=True)
        spawner.cert_paths = await spawner.move_certs(paths)
        assert spawner.cert_paths == paths  # unchanged: the hub and proxy keep using them
        url = await spawner.start()
        assert url == "https://127.0.0.1:12345"
        assert spawner.remote_scheme == "https"
        assert _move_call()["contents"] == {"keyfile": KEY, "certfile": CERT, "cafile": CA}
        env = _start_call()["env"]
        assert env["JUPYTERHUB_SSL_KEYFILE"].startswith("/site/moved/")  # not the hub's path
        assert not spawner._internal_ssl_pems  # sent, then forgotten
        await spawner.stop()


async def test_outpost_spawner_refuses_internal_ssl_without_certificates(start_outpost):
    from tornado import web

    async with start_outpost(CertSpawner) as op:
        spawner = make_spawner(op, internal_ssl=True)
        with pytest.raises(web.HTTPError, match="no certificates"):
            await spawner.start()
        assert not CertSpawner.calls


# --- where the files go by default (issue 11, part 9) --------------------------------------


def test_the_default_certs_dir_is_in_the_outposts_state_not_tmp(monkeypatch, tmp_path):
    """No fixed name under the temp directory (any local user could create it first): the
    default follows the state directory (or the working directory) only."""
    monkeypatch.chdir(ROOT)  # read only: the path is computed, nothing is made
    assert default_certs_base() == ROOT / "internal-ssl"
    assert default_certs_base(tmp_path / "state") == tmp_path / "state" / "internal-ssl"
    (tmp_path / "tmp").mkdir()
    for tmp in ("/tmp", str(tmp_path / "tmp")):
        monkeypatch.setenv("TMPDIR", tmp)
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
        assert tempfile.gettempdir() == tmp
        assert default_certs_base() == ROOT / "internal-ssl"


@pytest.mark.parametrize("configured", ["state_dir", "working directory"])
async def test_by_default_certificates_go_to_a_private_directory_of_the_state_dir(
    start_outpost, tmp_path, monkeypatch, configured
):
    state = tmp_path / "state"
    state.mkdir()
    traits = {"certs_dir": ""}  # the harness sets one; here the default
    if configured == "state_dir":
        traits["state_dir"] = str(state)
    else:
        traits["state_dir"] = ""  # the default (the harness sets one)
        monkeypatch.chdir(state)
    async with start_outpost(CertSpawner, **traits) as op:
        assert op.manager.certs_dir == str(state / "internal-ssl")
        start_id = uuid.uuid4().hex
        await op.client.start("gwen", start_id, user_name="gwen", env=HUB_ENV, internal_ssl=PEMS, wait_until_ready=True)
        base, name = certs_location("default", "gwen", start_id, op.manager.certs_dir)
        assert base == state / "internal-ssl" and mode(base) == 0o700
        assert os.lstat(base).st_uid == os.getuid()
        assert Path(_move_call()["move_certs"]["keyfile"]).parent == base / name
        await op.client.stop("gwen", start_id)
        assert not (base / name).exists()


@pytest.mark.parametrize("hostile", ["symlink", "others-directory", "group-writable"])
async def test_a_hostile_certs_dir_is_refused(start_outpost, tmp_path, hostile):
    """Something already at the certificates' place that is not the Outpost's own private
    directory fails the start with a message, and nothing is written into it."""
    state, elsewhere = tmp_path / "state", tmp_path / "attacker"
    state.mkdir()
    elsewhere.mkdir(mode=0o777)
    base = state / "internal-ssl"
    if hostile == "symlink":
        base.symlink_to(elsewhere)
    else:
        base.mkdir(mode=0o700)
        if hostile == "others-directory":
            if os.getuid() != 0:
                pytest.skip("needs root to give a directory to another user")
            os.chown(base, 65534, 65534)
        else:
            os.chmod(base, 0o770)
    async with start_outpost(CertSpawner, certs_dir="", state_dir=str(state)) as op:
        start_id = uuid.uuid4().hex
        r = await op.client.start(
            "hana", start_id, user_name="hana", env=HUB_ENV, internal_ssl=PEMS, wait_until_ready=True
        )
        assert r.status.state == pb.SERVER_STATE_STOPPED
        assert f"{base}, must be a directory of uid {os.getuid()} with mode 0700" in r.status.failure_message
        assert not any("move_certs" in c or c.get("start") for c in CertSpawner.calls)
        assert not list(elsewhere.iterdir()) and (hostile == "symlink" or not list(base.iterdir()))
        await op.client.stop("hana", start_id)
        assert base.is_symlink() == (hostile == "symlink")  # left as it was, for the admin


async def test_a_state_dir_anyone_may_write_to_is_warned_about(start_outpost, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    async with start_outpost(CertSpawner, certs_dir="", state_dir=str(shared)):
        pass
    assert f"certificates go to {shared / 'internal-ssl'}, in {shared}, which every local user" in caplog.text
    caplog.clear()
    async with start_outpost(CertSpawner):  # the harness's certs_dir, in a private tmp_path
        pass
    assert "which every local user" not in caplog.text
