"""The hub's side: a real JupyterHub, a hub's OutpostClient, a hub's OutpostSpawner.

- :class:`JupyterHubProcess`: a real JupyterHub 6 (with the real configurable-http-proxy
  from npm) for end-to-end tests and spawn_bench. It writes a jupyterhub_config.py, starts
  ``jupyterhub`` (optionally inside a network namespace), waits until the REST API
  answers, and drives it as a service with an API token (``TOKEN``). Stopped by PID (and
  the proxy by its pid file).
- :func:`hub_client`: an ``OutpostClient`` as one hub connects (TLS with its client
  certificate, and/or a bearer token).
- :func:`make_spawner`: an ``OutpostSpawner`` outside a hub (stand-in user and hub).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from outpost_client.client import OutpostClient, TLSConfig
from outpost_client.spawner import OutpostSpawner
from outpost_server.hosting import StandInHub, StandInUser

from .e2e_driver import read_progress
from .outpost import BIN, ROOT
from .procs import stop_process
from .util import free_port

CHP = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
TOKEN = "outpost-e2e-service-token-0123456789"

BASE_CONFIG = """
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://{ip}:{port}"
c.JupyterHub.hub_ip = "{ip}"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/cookie_secret"
c.JupyterHub.pid_file = "{workdir}/jupyterhub.pid"
c.JupyterHub.cleanup_servers = False
c.JupyterHub.cleanup_proxy = False
c.JupyterHub.allow_named_servers = True
c.ConfigurableHTTPProxy.api_url = "http://{ip}:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{workdir}/proxy.pid"
c.ConfigurableHTTPProxy.command = ["{chp}"]
c.ConfigurableHTTPProxy.auth_token = "proxy-token-for-tests-0123456789"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [{{"name": "e2e", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [{{
    "name": "e2e",
    "scopes": ["admin:users", "admin:servers", "admin:server_state", "tokens", "access:servers", "list:users", "read:users"],
    "services": ["e2e"],
}}]
c.JupyterHub.spawner_class = "outpost"
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}  # POST returns at once; follow progress
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
"""

# internal_ssl: the proxy's API must be https too (an http:// api_url kills the hub after 30 s)
INTERNAL_SSL_CONFIG = """
c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = "{workdir}/internal-ssl"
c.ConfigurableHTTPProxy.api_url = "https://{ip}:{proxy_api_port}"
"""


class JupyterHubProcess:
    def __init__(
        self, workdir: Path, extra_config: str, *, ip: str = "127.0.0.1", netns: str | None = None,
        internal_ssl: bool = False,
    ):
        self.workdir = workdir
        self.ip = ip
        self.netns = netns
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.url = f"http://{ip}:{self.port}"
        self.config = workdir / "jupyterhub_config.py"
        self.config.write_text(
            BASE_CONFIG.format(
                ip=ip, port=self.port, hub_port=self.hub_port, proxy_api_port=self.proxy_api_port,
                workdir=workdir, chp=CHP, token=TOKEN,
            )
            + (INTERNAL_SSL_CONFIG.format(ip=ip, proxy_api_port=self.proxy_api_port, workdir=workdir) if internal_ssl else "")
            + extra_config
        )
        self.internal_ssl = internal_ssl
        self.log = workdir / "jupyterhub.log"
        self.proc: subprocess.Popen | None = None

    @property
    def hub_api_url(self) -> str:
        return f"{'https' if self.internal_ssl else 'http'}://{self.ip}:{self.hub_port}/hub/api"

    def start(self) -> None:
        env = dict(os.environ, PATH=f"{BIN}:{CHP.parent}:{os.environ['PATH']}")
        cmd = [str(BIN / "jupyterhub"), "-f", str(self.config)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()

    def _api_up(self) -> bool:
        if self.netns:
            # only from inside the namespace (never from the root namespace)
            probe = f"import requests; print(requests.get('{self.url}/hub/api/', timeout=2).status_code)"
            out = subprocess.run(
                ["ip", "netns", "exec", self.netns, str(BIN / "python"), "-c", probe],
                capture_output=True, text=True, timeout=20,
            )
            return out.stdout.strip() == "200"
        try:
            return requests.get(f"{self.url}/hub/api/", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"JupyterHub exited {self.proc.returncode}:\n{self.tail()}")
            if await asyncio.to_thread(self._api_up):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"JupyterHub not up after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.2)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""

    async def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {TOKEN}"}
        return await asyncio.to_thread(
            requests.request, method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kwargs
        )

    async def get(self, path: str, **kwargs) -> requests.Response:
        """A request through the proxy (e.g. /user/alice/api/status) with the service token."""
        headers = {"Authorization": f"token {TOKEN}"}
        return await asyncio.to_thread(requests.get, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    async def progress(self, user: str, server: str = "", timeout: float = 90) -> list[dict]:
        """The hub's progress event stream of a spawn, until ready or failed."""
        path = f"/users/{user}/servers/{server}/progress" if server else f"/users/{user}/server/progress"

        headers = {"Authorization": f"token {TOKEN}"}
        return await asyncio.to_thread(read_progress, f"{self.url}/hub/api{path}", headers, timeout)

    async def request_spawn(self, user: str, server: str = "", options: dict | None = None) -> None:
        """Create the user if needed and ask the hub to start a server (returns at once)."""
        r = await self.api("POST", f"/users/{user}")
        assert r.status_code in (201, 409), r.text
        path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
        r = await self.api("POST", path, json=options or {})
        assert r.status_code in (201, 202), r.text

    async def spawn(self, user: str, server: str = "", options: dict | None = None) -> list[dict]:
        """Create the user if needed, start a server, return its progress events."""
        await self.request_spawn(user, server, options)
        return await self.progress(user, server)

    async def server_model(self, user: str, server: str = "") -> dict | None:
        r = await self.api("GET", f"/users/{user}")
        r.raise_for_status()
        return r.json()["servers"].get(server)

    async def stop_server(self, user: str, server: str = "") -> None:
        path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
        r = await self.api("DELETE", path)
        assert r.status_code in (202, 204), r.text
        deadline = time.monotonic() + 60
        while await self.server_model(user, server):
            assert time.monotonic() < deadline, "server did not stop"
            await asyncio.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        stop_process(self.proc, 30, sig)

    def stop_proxy(self) -> None:
        pid_file = self.workdir / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


# --- a hub's client of the Outpost, and its Spawner ---------------------------------------


def hub_client(
    address: str, pki=None, pair=None, *, ca: str | None = None, token: str | None = None, timeout: float = 5
) -> OutpostClient:
    """An OutpostClient as a hub connects: over TLS when ``pki`` (a ``generate_certs``
    result, for its CA) or ``ca`` is given, presenting ``pair`` (the hub's certificate and
    key; None: no client certificate); with ``token`` as its bearer token."""
    tls = None
    if pki is not None or ca is not None:
        tls = TLSConfig(ca=ca or pki.ca.cert, cert=pair and pair.cert, key=pair and pair.key)
    return OutpostClient(address, tls=tls, token=token, timeout=timeout)


class NamedOutpostSpawner(OutpostSpawner):
    """Spawner.name reads the hub's ORM object; without a hub, the test sets it."""

    test_name = ""

    @property
    def name(self):
        return self.test_name


def make_spawner(op, name: str = "", **traits) -> OutpostSpawner:
    """An OutpostSpawner for user alice's server ``name`` at the Outpost ``op`` (anything
    with an ``address``), outside a hub: stand-in user and hub, an API token."""
    user = StandInUser(name="alice", id=7, admin=False, url="/user/alice/")
    hub = StandInHub(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    spawner = NamedOutpostSpawner(user=user, hub=hub, orm_spawner=None, outpost_address=op.address, **traits)
    spawner.test_name = name
    spawner.api_token = "secret-token"
    return spawner
