"""End to end: auth_state for the site's Spawner (issue 14, part 2). A real JupyterHub (real
proxy) whose Authenticator keeps a known auth_state (enable_auth_state), a user who logs in
on its login page, and an Outpost process over mTLS whose Spawner (SimpleLocalProcessSpawner,
running jupyterhub-singleuser) writes what ``await self.user.get_auth_state()`` gives it."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
import requests

from .harness.e2e_driver import hub_login
from .harness.outpost import BIN, sqlite_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "e2e-access-token-5c1d7e9f3a2b"
REFRESH = "e2e-refresh-token-8b4a6c2e0f1d"

SITE = """
import json
from jupyterhub.spawner import SimpleLocalProcessSpawner

c = get_config()  # noqa


class AuthStateSiteSpawner(SimpleLocalProcessSpawner):
    \"\"\"A site Spawner that acts for the user: it reads the user's auth_state.\"\"\"

    async def start(self):
        with open("{workdir}/site_saw.json", "w") as f:
            json.dump(await self.user.get_auth_state(), f)
        return await super().start()


c.Outpost.spawner_class = AuthStateSiteSpawner
c.Outpost.tls_cert = "{tls_cert}"
c.Outpost.tls_key = "{tls_key}"
c.Outpost.tls_client_ca = "{ca}"
c.Outpost.user_mapping = "{{name}}"
c.Outpost.allow_auth_state = {{"hub-a": True}}
c.Outpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.Outpost.log_level = "DEBUG"
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home/{{username}}"
c.Spawner.cmd = ["{bin}/jupyterhub-singleuser"]
c.Spawner.args = ["--allow-root"]
"""

HUB = """
import json, os
from jupyterhub.auth import DummyAuthenticator

os.environ["JUPYTERHUB_CRYPT_KEY"] = "{crypt_key}"
AUTH_STATE = {auth_state!r}


class StateAuthenticator(DummyAuthenticator):
    \"\"\"Any password; the user's auth_state is the known one (as an OAuthenticator
    would keep the tokens of the login).\"\"\"

    async def authenticate(self, handler, data):
        return {{"name": data["username"], "auth_state": AUTH_STATE}}


def auth_state_hook(spawner, auth_state):
    with open("{hub_saw}", "w") as f:
        json.dump(auth_state, f)


c.JupyterHub.authenticator_class = StateAuthenticator
c.StateAuthenticator.enable_auth_state = True
c.Spawner.auth_state_hook = auth_state_hook
c.OutpostSpawner.outpost_address = "{address}"
c.OutpostSpawner.outpost_ca = "{ca}"
c.OutpostSpawner.outpost_cert = "{cert}"
c.OutpostSpawner.outpost_key = "{key}"
c.OutpostSpawner.send_auth_state = True
"""


def login(hub_url: str, user: str) -> None:
    """Log in on the hub's login page, as a browser does (not following the redirect to
    the spawn: the test starts the server itself)."""
    r = hub_login(requests.Session(), hub_url, user, follow=False)
    assert r.status_code == 302, (r.status_code, r.text[:500])


async def test_auth_state_reaches_the_site_spawner_from_a_real_hub(outpost_process, hub_factory, pki, tmp_path):
    auth_state = {
        "access_token": SECRET,
        "refresh_token": REFRESH,
        "expires_at": 1767225600,
        "oauth_user": {"sub": "alice@idp", "groups": ["hpc"]},
    }
    op = outpost_process("", name="site")
    op.config.write_text(
        SITE.format(
            workdir=op.workdir, bin=BIN, tls_cert=pki.server.cert, tls_key=pki.server.key, ca=pki.ca.cert
        )
    )
    op.start()
    await op.wait_log("serving jupyterhub.outpost.v1.OutpostService")

    hub_saw = tmp_path / "hub_saw.json"
    pair = pki.hubs["hub-a"]
    hub = hub_factory(
        HUB.format(
            crypt_key="0" * 63 + "1", auth_state=auth_state, hub_saw=hub_saw, address=op.address,
            ca=pki.ca.cert, cert=pair.cert, key=pair.key,
        )  # fmt: skip
    )
    hub.start()
    await hub.wait_ready()
    await asyncio.to_thread(login, hub.url, "alice")

    events = await hub.spawn("alice")
    assert events[-1].get("ready"), (events, hub.tail(), op.tail())
    r = await hub.get("/user/alice/api/status")
    assert r.status_code == 200, (r.status_code, r.text)

    # the site's Spawner read exactly what the hub's auth_state_hook saw
    hook = json.loads(hub_saw.read_text())
    assert hook == auth_state
    assert json.loads((op.workdir / "site_saw.json").read_text()) == hook

    # the Outpost stored it (its row has it, encrypted), never in clear, never logged
    db_file = op.workdir / "outpost.sqlite"
    with sqlite3.connect(db_file) as db:
        (stored,) = db.execute("SELECT auth_state FROM outpost_servers WHERE server_name = 'alice'").fetchone()
    assert set(json.loads(stored)) == {"fernet"}
    raw = sqlite_bytes(db_file)
    for secret in (SECRET, REFRESH, "alice@idp"):
        assert secret.encode() not in raw
        assert secret not in op.tail(10**7)  # the Outpost's log, at DEBUG
        assert secret not in hub.tail(10**7)  # the hub's log

    # Stop removes it with the server's row
    await hub.stop_server("alice")
    with sqlite3.connect(db_file) as db:
        assert db.execute("SELECT count(*) FROM outpost_servers").fetchone() == (0,)
