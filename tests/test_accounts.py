"""Which local account a hub's user runs as (outpost_server/accounts.py): the site's
c.Outpost.user_mapping and allow_users, and the rule that no hub's user runs as root or a
system account, whatever the Spawner. A refusal is PERMISSION_DENIED (USER_NOT_ALLOWED)
before anything is made or stored; the hosted Spawner sees the local account as
user.name, the notebook's URLs and JUPYTERHUB_USER keep the hub's name."""

from __future__ import annotations

import asyncio
import os
import pwd
import tempfile
from pathlib import Path

import grpc
import pytest
from traitlets import TraitError

from outpost_client import ServerNotFound, UserNotAllowed, pb
from outpost_client.errors import USER_NOT_ALLOWED
from outpost_client.spawner import OutpostStartFailed
from outpost_server.accounts import (
    AccountsConfigError,
    check_mapping,
    configured_hubs,
    default_mapping,
    map_user,
    read_login_defs,
    valid_account_name,
)
from outpost_server.app import Outpost
from outpost_server.identity import hash_token
from outpost_server.testing import RecordingSpawner

from .harness.hub import hub_client, make_spawner
from .harness.outpost import one_line, outpost_config, run_outpost, running_outpost, stored_rows
from .harness.procs import process_alive
from .harness.util import notebook_account, sid, wait_for

pytestmark = pytest.mark.rpc

RECORDING = "outpost_server.testing.RecordingSpawner"
FAST = {"RecordingSpawner.delay": 0.01, "RecordingSpawner.steps": 1}
TOKEN_A, TOKEN_B = "a" * 40, "b" * 40
TWO_HUBS = {"hub-a": hash_token(TOKEN_A), "hub-b": hash_token(TOKEN_B)}


# --- pure: the mapping, names, login.defs, how many hubs -------------------------------------


async def test_mapping_shapes():
    assert await map_user("{hub}-{name}", "a", "alice") == "a-alice"
    by_hub = {"a": "{name}", "b": {"alice": "bob2"}}
    assert await map_user(by_hub, "a", "alice") == "alice"
    assert await map_user(by_hub, "b", "alice") == "bob2"
    assert await map_user(by_hub, "b", "carol") is None  # a user the dict does not name
    assert await map_user(by_hub, "c", "alice") is None  # a hub it does not name

    async def remote(hub, name):
        return f"x{name}"

    assert await map_user(remote, "a", "alice") == "xalice"
    assert await map_user(lambda hub, name: None, "a", "alice") is None


@pytest.mark.parametrize(
    "mapping, message",
    [
        ("{user}", "may use only {hub} and {name}"),
        ("{name.__class__}", "may use only {hub} and {name}"),
        ("{name!r}", "may use only {hub} and {name}"),
        ("{name", "not a valid template"),
        ({"a": 3}, "a hub's rule is a template or a dict"),
        ({"a": {"alice": 1}}, "a dict maps hub user names to local account names"),
        (["alice"], "must be a template"),
    ],
)
def test_bad_mappings_stop_the_outpost_with_a_reason(mapping, message):
    with pytest.raises(ValueError, match="user_mapping"):
        check_mapping(mapping)
    with pytest.raises(TraitError) as info:
        Outpost(user_mapping=mapping)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name, valid",
    [
        ("alice", True), ("a-alice", True), ("Bob.Smith_2", True), ("_svc", True), ("x" * 32, True),
        ("x" * 33, False), ("-rf", False), (".hidden", False), ("1000", False), ("a b", False),
        ("a;id", False), ("alice@example.org", False), ("a/b", False), ("", False), ("ünï", False),
    ],
)  # fmt: skip
def test_plain_account_names(name, valid):
    assert valid_account_name(name) is valid


def test_uid_range_from_login_defs(tmp_path):
    defs = tmp_path / "login.defs"
    defs.write_text("# UID_MIN 5\nUID_MIN\t\t 2000\nUID_MAX   3000\nSYS_UID_MIN 100\n")
    assert read_login_defs(str(defs)) == (2000, 3000)
    assert read_login_defs(str(tmp_path / "missing")) == (1000, 60000)
    assert Outpost(account_uid_min=500).account_uid_min == 500
    with pytest.raises(TraitError):
        Outpost(account_uid_min=0)  # uid 0 is root, refused whatever the range
    with pytest.raises(AccountsConfigError, match=r"account_uid_min \(5000\) is above account_uid_max \(4000\)"):
        Outpost(account_uid_min=5000, account_uid_max=4000).account_policy()


def test_which_configurations_have_several_hubs():
    def hubs(**kw):
        base = dict(tls=False, client_ca=False, hub_tokens={}, identity_map={}, allowed_hubs=[], default_hub="default")
        return configured_hubs(**{**base, **kw})

    assert hubs() == {"default"}  # plaintext: the default hub alone
    assert hubs(forwarder_hubs=["default"]) == {"default"}
    assert hubs(forwarder_hubs=["hub-a"]) == {"default", "hub-a"}
    assert hubs(hub_tokens=TWO_HUBS) == {"hub-a", "hub-b"}  # default_hub is no identity then
    assert hubs(tls=True, client_ca=True) is None  # any certificate the CA signed
    assert hubs(tls=True, client_ca=True, allowed_hubs=["main"], identity_map={"hub-a.org": "main"}) == {"main"}
    assert default_mapping({"main"}) == "{name}"
    with pytest.raises(AccountsConfigError, match=r"hubs hub-a, hub-b can use this Outpost: set c.Outpost.user_mapping"):
        default_mapping({"hub-a", "hub-b"})
    with pytest.raises(AccountsConfigError, match=r"allowed_hubs is empty"):
        default_mapping(None)


async def test_passwd_is_asked_once_a_minute_per_account(monkeypatch):
    from outpost_server import accounts

    asked = []

    def lookup(account, uid_min, uid_max):
        asked.append(account)
        return 0 if account == "root" else None

    monkeypatch.setattr(accounts, "system_account", lookup)
    policy = accounts.AccountPolicy("{name}", uid_min=1000, uid_max=60000)
    assert [await policy.local_account("h", "ann") for _ in range(3)] == ["ann"] * 3
    for _ in range(2):
        with pytest.raises(UserNotAllowed):
            await policy.local_account("h", "root")
    assert asked == ["ann", "root"]
    monkeypatch.setattr(accounts, "LOOKUP_TTL", 0.0)  # expired: asked again
    await policy.local_account("h", "bob")
    await policy.local_account("h", "bob")
    assert asked == ["ann", "root", "bob", "bob"]


# --- refusals: root, system accounts, what the mapping does not give -------------------------------


@pytest.mark.parametrize("user", ["root", "daemon", "nobody", "bin"])
async def test_root_and_system_accounts_are_refused_and_nothing_is_made(start_outpost, user):
    assert user == "root" or not 1000 <= pwd.getpwnam(user).pw_uid <= 60000
    async with start_outpost(RECORDING, user_mapping=None, **FAST) as op:
        with pytest.raises(UserNotAllowed) as err:
            await op.client.start("nb", sid(), user_name=user, wait_until_ready=True)
        e = err.value
        assert (e.code, e.reason) == (grpc.StatusCode.PERMISSION_DENIED, USER_NOT_ALLOWED)
        assert e.metadata == {"user_name": user, "account": user}
        assert f"never runs servers as {user!r}: it is a system account" in e.message
        with pytest.raises(ServerNotFound):
            await op.client.poll("nb")
        assert await stored_rows(op.app) == [] and RecordingSpawner.started == []
        # an ordinary name of the same hub still starts
        ok = await op.client.start("nb", sid(), user_name="alice", wait_until_ready=True)
        assert ok.status.state == pb.SERVER_STATE_RUNNING


async def test_the_hubs_user_reads_why_on_the_spawn_page(start_outpost):
    """Through OutpostSpawner, as on the spawn page: the sentence says the account is a
    system account; nothing was started, so there is nothing to poll or stop."""
    async with start_outpost(RECORDING, user_mapping=None, **FAST) as op:
        spawner = make_spawner(op)
        spawner.user.name = "root"
        with pytest.raises(OutpostStartFailed) as err:
            await spawner.start()
        assert "never runs servers as 'root': it is a system account at this site" in (
            err.value.jupyterhub_message
        )
        assert spawner.start_id == "" and RecordingSpawner.started == []


async def test_a_mapping_onto_root_is_refused_too(start_outpost):
    async with start_outpost(RECORDING, user_mapping={"default": {"alice": "root", "ann": "1000"}}, **FAST) as op:
        with pytest.raises(UserNotAllowed, match="system account") as err:
            await op.client.start("a", sid(), user_name="alice")
        assert err.value.metadata == {"user_name": "alice", "account": "root"}
        with pytest.raises(UserNotAllowed, match=r"'1000' \(the account of your user 'ann'\)"):
            await op.client.start("b", sid(), user_name="ann")  # would be read as uid 1000
        with pytest.raises(UserNotAllowed, match=r"no local account for your user 'bob'"):
            await op.client.start("c", sid(), user_name="bob")
        assert await stored_rows(op.app) == [] and RecordingSpawner.started == []


async def test_names_that_are_no_plain_account_are_refused(start_outpost):
    async with start_outpost(RECORDING, user_mapping=None, **FAST) as op:
        for name in ("alice@example.org", "-rf", "a b"):
            with pytest.raises(UserNotAllowed, match="a local account name has letters, digits"):
                await op.client.start("nb", sid(), user_name=name)
        assert RecordingSpawner.started == []


async def test_a_callable_mapping_sync_or_async_refuses_by_raising(start_outpost):
    async def mapping(hub, name):
        await asyncio.sleep(0)
        if name.endswith("@uni.example"):
            return "u_" + name.split("@")[0]
        raise LookupError(f"{name} has no account at the HPC centre; apply at https://hpc.example/apply")

    async with start_outpost(RECORDING, user_mapping=mapping, **FAST) as op:
        await op.client.start("nb", sid(), user_name="ann@uni.example", wait_until_ready=True)
        with pytest.raises(UserNotAllowed, match="has no account at the HPC centre; apply at") as err:
            await op.client.start("nb2", sid(), user_name="eve")
        assert err.value.metadata == {"user_name": "eve"}
    [spawner] = RecordingSpawner.started
    assert spawner.user.name == "u_ann"
    assert spawner.user.url == "/user/ann@uni.example/" and spawner.get_env()["JUPYTERHUB_USER"] == "ann@uni.example"


async def test_allow_users_restricts_further(start_outpost):
    def only_staff(hub, account):
        return account.startswith("staff-")

    rule = {"default": only_staff}
    async with start_outpost(RECORDING, user_mapping="{name}", allow_users=rule, **FAST) as op:
        await op.client.start("nb", sid(), user_name="staff-ann", wait_until_ready=True)
        with pytest.raises(UserNotAllowed, match=r"does not run servers as 'bob' for your hub"):
            await op.client.start("nb2", sid(), user_name="bob")
    async with start_outpost(RECORDING, allow_users=["ann"], **FAST) as op:
        await op.client.start("nb", sid(), user_name="ann", wait_until_ready=True)
        with pytest.raises(UserNotAllowed):
            await op.client.start("nb2", sid(), user_name="bob")
    with pytest.raises(TraitError, match="allow_users"):
        Outpost(allow_users="ann")  # a string is not a list of accounts


# --- several hubs ------------------------------------------------------------------------------


async def test_hub_name_template_keeps_two_hubs_alice_apart(start_outpost):
    async with start_outpost(RECORDING, hub_tokens=TWO_HUBS, user_mapping="{hub}-{name}", **FAST) as op:
        async with hub_client(op.address, token=TOKEN_A) as a, hub_client(op.address, token=TOKEN_B) as b:
            env = {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}
            await a.start("alice", sid(), user_name="alice", env=env, wait_until_ready=True)
            await b.start("alice", sid(), user_name="alice", env=env, wait_until_ready=True)
            # the hubs see their own user's name
            assert [s.user_name for s in await a.list_servers()] == ["alice"]
            assert [s.user_name for s in await b.list_servers()] == ["alice"]
        rows = {r["hub"]: r["user_info"] for r in await stored_rows(op.app)}
    assert {hub: info["account"] for hub, info in rows.items()} == {"hub-a": "hub-a-alice", "hub-b": "hub-b-alice"}
    seen = sorted(s.user.name for s in RecordingSpawner.started)
    assert seen == ["hub-a-alice", "hub-b-alice"]
    for spawner in RecordingSpawner.started:
        env = spawner.get_env()
        assert env["JUPYTERHUB_USER"] == "alice" and env["JUPYTERHUB_SERVICE_PREFIX"] == "/user/alice/"
        assert spawner.user.url == "/user/alice/" and spawner.user.hub_name == "alice"
        assert spawner.oauth_access_scopes == ["access:servers!server=alice/", "access:servers!user=alice"]
        assert spawner.template_namespace()["username"] == spawner.user.name  # {username} in site commands


async def test_several_hubs_without_a_mapping_refuse_to_start(tmp_path, pki):
    cfg = outpost_config(tmp_path, RECORDING, hub_tokens=TWO_HUBS, user_mapping=None)
    with pytest.raises(AccountsConfigError, match="hubs hub-a, hub-b can use this Outpost"):
        async with running_outpost(cfg):
            pass
    mtls = dict(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert)
    with pytest.raises(AccountsConfigError, match=r"allowed_hubs is empty\): set c.Outpost.user_mapping"):
        async with running_outpost(outpost_config(tmp_path, RECORDING, user_mapping=None, **mtls)):
            pass
    # one allowed hub: "{name}" is its default, as before
    async with running_outpost(outpost_config(tmp_path, RECORDING, user_mapping=None, allowed_hubs=["hub-a"], **mtls)):
        pass


def test_the_console_script_says_so_in_one_line(tmp_path):
    (tmp_path / "outpost_config.py").write_text(
        "c.Outpost.spawner_class = 'outpost_server.testing.InstantSpawner'\n"
        f"c.Outpost.hub_tokens = {TWO_HUBS!r}\n"
    )
    line = one_line(run_outpost("--port", "0", cwd=tmp_path))
    assert 'set c.Outpost.user_mapping to choose which local account each hub\'s user runs as, e.g. "{hub}-{name}"' in line
    assert not (tmp_path / "outpost.sqlite").exists()


# --- the account is the server's: a restart with another mapping keeps it --------------------------


async def test_the_local_account_survives_a_restore_under_a_changed_mapping(tmp_path):
    db = f"sqlite:///{tmp_path}/outpost.sqlite"
    cfg = outpost_config(tmp_path, RECORDING, db, user_mapping="site-{name}", **FAST)
    async with running_outpost(cfg) as op:
        await op.client.start("nb", "s1", user_name="alice", wait_until_ready=True)
        assert op.manager.records[("default", "nb")].spawner.user.name == "site-alice"
    cfg = outpost_config(tmp_path, RECORDING, db, user_mapping="{name}", **FAST)
    async with running_outpost(cfg) as op:
        rec = op.manager.records[("default", "nb")]
        assert rec.state == pb.SERVER_STATE_RUNNING
        assert rec.spawner.user.name == "site-alice" and rec.spawner.user.hub_name == "alice"
        # a new start takes the new mapping
        await op.client.start("nb2", "s2", user_name="alice", wait_until_ready=True)
        assert op.manager.records[("default", "nb2")].spawner.user.name == "alice"


# --- the real LocalProcessSpawner, as root ------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="LocalProcessSpawner switches users only as root")


@pytest.fixture
def shared_dir():
    """A directory every account may write to (pytest's tmp_path is 0700 root)."""
    import shutil

    d = Path(tempfile.mkdtemp(prefix="outpost-accounts-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def local_process_traits(out: Path) -> dict:
    # the "notebook": writes the uid it runs as, then waits to be stopped
    script = f'id -u > {out}/uid-$$; echo $$ > {out}/pid; exec sleep 120'
    return {"LocalProcessSpawner.cmd": ["/bin/sh", "-c", script, "notebook"], "poll_interval": 0.2}


@needs_root
async def test_local_process_spawner_never_starts_root_and_runs_as_the_mapped_account(start_outpost, shared_dir):
    name = notebook_account()  # made with useradd: a uid in the site's range
    account = pwd.getpwnam(name)
    mapping = {"default": {"alice": name, "root": "root", "admin": "root"}}  # root never, even so
    traits = local_process_traits(shared_dir)
    async with start_outpost("localprocess", user_mapping=mapping, **traits) as op:
        for user in ("root", "admin"):  # by name, and mapped onto root
            with pytest.raises(UserNotAllowed, match="never runs servers as 'root'"):
                await op.client.start("nb", sid(), user_name=user, wait_until_ready=True)
        assert list(shared_dir.iterdir()) == []  # no process ran at all
        start_id = sid()
        r = await op.client.start("nb", start_id, user_name="alice", wait_until_ready=True)
        assert r.status.state == pb.SERVER_STATE_RUNNING, r.status.failure_message
        await wait_for(lambda: (shared_dir / "pid").exists() and any(shared_dir.glob("uid-*")))
        [uid_file] = shared_dir.glob("uid-*")
        assert int(uid_file.read_text()) == account.pw_uid != 0
        pid = int((shared_dir / "pid").read_text())
        assert os.stat(f"/proc/{pid}").st_uid == account.pw_uid
        assert (await op.client.stop("nb", start_id)).outcome == pb.STOP_OUTCOME_STOPPED
        await wait_for(lambda: not process_alive(pid))
