"""auth_state for the site's Spawner (issue 14, part 2): the hub's OutpostSpawner sends the
user's auth_state only when configured and only over TLS; the Outpost accepts it only from
hubs its allow_auth_state allows (and never on plaintext), stores it encrypted, never logs
it, gives it to the hosted Spawner as ``await self.user.get_auth_state()`` (and its
auth_state_hook), keeps it across a restart, and deletes it when the server stops.

A real Outpost in this process with mTLS (the ``pki`` hubs) and the real OutpostSpawner
and OutpostClient; the end-to-end test with a real JupyterHub is in
tests/test_e2e_auth_state.py.
"""

from __future__ import annotations

import logging

import pytest
from jupyterhub.spawner import Spawner

from outpost_client import AuthStateNotAllowed, InvalidArgument, pb
from outpost_client import spawner as spawner_module
from outpost_server.hosting import redacted_values, secrets_in_auth_state
from outpost_server.testing import class_state

from .harness.hub import hub_client, make_spawner
from .harness.outpost import outpost_config, running_outpost, sqlite_bytes, stored_rows

pytestmark = pytest.mark.rpc

SECRET = "oauth-access-token-7f3c9a1e5b2d"
REFRESH = "oauth-refresh-token-0d9e8c7b6a5f"
AUTH_STATE = {
    "access_token": SECRET,
    "refresh_token": REFRESH,
    "expires_at": 1767225600,
    "scopes": ["openid", "profile"],
    "oauth_user": {"sub": "alice@idp", "groups": ["hpc", "gpu"], "verified": True, "quota": 2.5},
    "id_token": None,
}


@class_state("seen", "hook_saw", "stopped_with")
class AuthStateSpawner(Spawner):
    """Records what it reads of ``self.user.get_auth_state()`` in start() and stop(), and
    logs it (as a careless Spawner would): the Outpost's log must not show it."""

    seen: list = []
    hook_saw: list = []
    stopped_with: list = []
    fail = False

    async def start(self):
        auth_state = await self.user.get_auth_state()
        AuthStateSpawner.seen.append(auth_state)
        self.log.info("starting with auth_state %s", auth_state)
        if self.fail:
            raise RuntimeError("the site's service refused the token")
        return ("127.0.0.1", 23999)

    async def poll(self):
        return None

    async def stop(self, now=False):
        AuthStateSpawner.stopped_with.append(await self.user.get_auth_state())


def record_hook(spawner, auth_state):
    AuthStateSpawner.hook_saw.append(auth_state)


def mtls(pki, **traits) -> dict:
    return dict(
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
        **{"AuthStateSpawner.auth_state_hook": record_hook},
        **traits,
    )


def hub_spawner(op, pki, hub="hub-a", auth_state=AUTH_STATE, **traits):
    """The hub's OutpostSpawner for alice, over mTLS as ``hub``, alice having auth_state."""
    pair = pki.hubs[hub]
    spawner = make_spawner(op, outpost_ca=pki.ca.cert, outpost_cert=pair.cert, outpost_key=pair.key, **traits)
    spawner.user.auth_state = auth_state
    return spawner


@pytest.fixture(autouse=True)
def _forget_warnings():
    spawner_module._warned_auth_state_in_clear.clear()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def outpost_log():
    """Every line the Outpost's lifecycle loggers write (hosted Spawners' logs included),
    at DEBUG, whatever an earlier test did to the "outpost" logger (a hub's Spawner
    adopts it: outpost_client.spawner.adopt_hub_logging)."""
    logger = logging.getLogger("outpost.manager")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_auth_state_reaches_the_hosted_spawner_encrypted_never_logged_and_stop_removes_it(
    start_outpost, pki, outpost_log
):
    async with start_outpost(AuthStateSpawner, **mtls(pki, allow_auth_state=True)) as op:
        spawner = hub_spawner(op, pki, send_auth_state=True)
        await spawner.start()
        # the hosted Spawner reads exactly the hub's auth_state; its auth_state_hook got it
        assert AuthStateSpawner.seen == [AUTH_STATE]
        assert AuthStateSpawner.hook_saw == [AUTH_STATE]
        # a copy per call: what a Spawner changes in it is not what the next call reads
        hosted = op.manager.records[("hub-a", "alice")].spawner
        (await hosted.user.get_auth_state())["access_token"] = "changed"
        assert await hosted.user.get_auth_state() == AUTH_STATE

        # stored, encrypted: the database files never hold it in clear
        (row,) = await stored_rows(op.app)
        assert row["auth_state"] == AUTH_STATE  # decrypted with the Outpost's key
        raw = sqlite_bytes(op.app.db_url.removeprefix("sqlite:///"))
        assert SECRET.encode() not in raw and REFRESH.encode() not in raw
        assert b"alice@idp" not in raw
        # never logged: the Spawner's own log line is redacted
        logged = "\n".join(outpost_log)
        assert "starting with auth_state" in logged and "[secret]" in logged
        assert SECRET not in logged and REFRESH not in logged

        await spawner.stop()
        assert AuthStateSpawner.stopped_with == [AUTH_STATE]  # stop() may act for the user
        assert await stored_rows(op.app) == []
        assert ("hub-a", "alice") not in op.manager.records


async def test_auth_state_survives_an_outpost_restart(tmp_path, pki):
    config = outpost_config(tmp_path, AuthStateSpawner, **mtls(pki, allow_auth_state=True))
    async with running_outpost(config) as op:
        spawner = hub_spawner(op, pki, send_auth_state=True)
        await spawner.start()
    async with running_outpost(config) as op:
        rec = op.manager.records[("hub-a", "alice")]
        assert rec.state == pb.SERVER_STATE_RUNNING
        assert await rec.spawner.user.get_auth_state() == AUTH_STATE
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as client:
            await client.stop("alice")
        assert AuthStateSpawner.stopped_with == [AUTH_STATE]
        assert await stored_rows(op.app) == []


async def test_auth_state_is_refused_unless_the_site_allows_it(start_outpost, pki):
    async def refused(op, hub, auth_state=AUTH_STATE) -> AuthStateNotAllowed:
        async with hub_client(op.address, pki, pki.hubs[hub]) as client:
            with pytest.raises(AuthStateNotAllowed) as info:
                await client.start("alice", "s1", user_name="alice", auth_state=auth_state)
            assert await client.list_servers() == []  # nothing started or stored
        assert SECRET not in info.value.message
        return info.value

    # the default: no hub may send it; the keys are named, never the values
    async with start_outpost(AuthStateSpawner, **mtls(pki)) as op:
        error = await refused(op, "hub-a")
        assert error.code.name == "PERMISSION_DENIED"
        assert error.metadata["keys"] == ",".join(sorted(AUTH_STATE))
        assert "access_token" in error.message and "allow_auth_state" in error.message
    # per hub, and by key
    policy = {"hub-a": ["access_token", "expires_at"], "hub-b": False}
    async with start_outpost(AuthStateSpawner, **mtls(pki, allow_auth_state=policy)) as op:
        assert (await refused(op, "hub-b")).metadata["keys"] == ",".join(sorted(AUTH_STATE))
        error = await refused(op, "hub-a")
        assert error.metadata["keys"] == "id_token,oauth_user,refresh_token,scopes"
        allowed = {"access_token": SECRET, "expires_at": 1767225600}
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as client:
            await client.start("alice", "s1", user_name="alice", auth_state=allowed, wait_until_ready=True)
            assert AuthStateSpawner.seen == [allowed]
            await client.stop("alice")


async def test_auth_state_is_refused_by_an_outpost_serving_plaintext(start_outpost, capsys):
    async with start_outpost(AuthStateSpawner, allow_auth_state=True) as op:
        # the operator is told at start-up
        assert "allow_auth_state is set, but this Outpost serves plaintext" in capsys.readouterr().err
        with pytest.raises(AuthStateNotAllowed, match="travels only over TLS"):
            await op.client.start("alice", "s1", user_name="alice", auth_state={"access_token": SECRET})
        assert await op.client.list_servers() == []
        # without auth_state, the same Outpost starts servers as before
        await op.client.start("alice", "s1", user_name="alice", wait_until_ready=True)
        assert AuthStateSpawner.seen == [None] and AuthStateSpawner.hook_saw == []
        await op.client.stop("alice")


async def test_the_hub_sends_no_auth_state_over_a_plaintext_channel(start_outpost, caplog):
    """send_auth_state with a plaintext channel: nothing is sent (the start goes on without
    it), and the hub's log says so once per Outpost, not at every start."""
    caplog.set_level(logging.WARNING)
    async with start_outpost(AuthStateSpawner, allow_auth_state=True) as op:
        for _ in range(2):
            # the hub's log, as JupyterHub gives its Spawners one
            spawner = make_spawner(op, send_auth_state=True, log=logging.getLogger("test.hub"))
            spawner.user.auth_state = AUTH_STATE
            await spawner.start()
            await spawner.stop()
        assert AuthStateSpawner.seen == [None, None]
        warnings = [r for r in caplog.records if "auth_state is not sent" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert SECRET not in caplog.text


async def test_auth_state_is_sent_only_when_configured_and_as_the_filter_shapes_it(start_outpost, pki):
    async def keep_the_token(spawner, auth_state):
        assert spawner.outpost_name == "default"
        return {"access_token": auth_state["access_token"]}

    async with start_outpost(AuthStateSpawner, **mtls(pki, allow_auth_state=True)) as op:
        # off by default: the hosted Spawner reads None, as for a hub without auth_state
        spawner = hub_spawner(op, pki)
        await spawner.start()
        await spawner.stop()
        # a filter (async here; sync works too) decides what travels; None sends nothing
        spawner = hub_spawner(op, pki, send_auth_state=True, auth_state_filter=keep_the_token)
        await spawner.start()
        await spawner.stop()
        spawner = hub_spawner(op, pki, send_auth_state=True, auth_state_filter=lambda spawner, state: None)
        await spawner.start()
        await spawner.stop()
        # a user without auth_state: none is sent
        spawner = hub_spawner(op, pki, auth_state=None, send_auth_state=True)
        await spawner.start()
        await spawner.stop()
    assert AuthStateSpawner.seen == [None, {"access_token": SECRET}, None, None]


async def test_an_oversized_auth_state_is_invalid_and_not_echoed(start_outpost, pki):
    big = {"access_token": SECRET, "blob": "x" * 300}
    async with start_outpost(AuthStateSpawner, **mtls(pki, allow_auth_state=True, max_auth_state_bytes=256)) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as client:
            with pytest.raises(InvalidArgument, match="max_auth_state_bytes") as info:
                await client.start("alice", "s1", user_name="alice", auth_state=big)
            assert info.value.metadata["field"] == "auth_state"
            assert SECRET not in info.value.message
            await client.start("alice", "s1", user_name="alice", auth_state={"access_token": SECRET})
            await client.stop("alice")


async def test_auth_state_is_deleted_when_a_start_fails(start_outpost, pki, monkeypatch):
    """A failed start's clean-up stop() still has it; then the row (kept STOPPED for the
    hub's next poll) no longer holds it."""
    monkeypatch.setattr(AuthStateSpawner, "fail", True)
    async with start_outpost(AuthStateSpawner, **mtls(pki, allow_auth_state=True)) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as client:
            r = await client.start("alice", "s1", user_name="alice", auth_state=AUTH_STATE, wait_until_ready=True)
            assert r.status.state == pb.SERVER_STATE_STOPPED and "refused the token" in r.status.failure_message
        assert AuthStateSpawner.stopped_with == [AUTH_STATE]
        (row,) = await stored_rows(op.app)
        assert row["state"] == "stopped" and row["auth_state"] is None
        assert op.manager.records[("hub-a", "alice")].spec.auth_state is None


def test_auth_state_strings_are_redacted_in_the_hosted_spawners_log():
    found = secrets_in_auth_state(AUTH_STATE)
    assert SECRET in found and REFRESH in found and "alice@idp" in found
    assert "openid" not in found  # shorter than 8 characters: would blot out ordinary words
    assert redacted_values(("a-longer-secret",), ("secret12",)) == ("a-longer-secret", "secret12")
