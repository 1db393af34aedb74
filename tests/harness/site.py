"""A site: an Outpost process as a site runs it, and what a hub needs to use it.

The end-to-end tests (a real JupyterHub spawning through the Outpost), the Slurm tests and
spawn_bench all use :class:`Site`; the ``make_site`` fixture (tests/conftest.py) makes
started ones and stops their servers after the test.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import asyncssh

from outpost_client.client import OutpostClient
from outpost_server.crypto import Crypt

from .outpost import BIN, outpost_env
from .util import free_port, wait_for

# The default site: SimpleLocalProcessSpawner (with progress messages of its own) running
# jupyterhub-singleuser, the notebooks' home dirs in the work dir.
SITE_CONFIG = """
from jupyterhub.spawner import SimpleLocalProcessSpawner

c = get_config()  # noqa


class SiteSpawner(SimpleLocalProcessSpawner):
    \"\"\"The site's own Spawner, with its own progress messages.\"\"\"

    async def progress(self):
        yield {{"progress": 30, "message": "{site}: preparing a notebook for " + self.user.name}}
        yield {{"progress": 60, "message": "{site}: starting jupyterhub-singleuser"}}


c.Outpost.spawner_class = SiteSpawner
c.Outpost.ip = "{ip}"
c.Outpost.allow_plaintext = {allow_plaintext}
c.Outpost.db_url = "sqlite:///{workdir}/outpost.sqlite"
c.Outpost.poll_interval = 2
c.SimpleLocalProcessSpawner.home_dir_template = "{workdir}/home/{{username}}"
c.Spawner.cmd = ["{bin}/jupyterhub-singleuser"]
c.Spawner.args = ["--allow-root"]
c.Spawner.environment = {{"OUTPOST_SITE": "{site}"}}
"""

# The embedded SSH forwarder, with the hub's key and the hub API reverse forward.
FORWARDER_CONFIG = """\
c.SSHForwarder.enabled = True
c.SSHForwarder.ip = "{ip}"
c.SSHForwarder.port = {ssh_port}
c.SSHForwarder.host_key_file = "{workdir}/ssh_host_key"
c.SSHForwarder.authorized_keys = {{"default": ["{hub_pub}"]}}
c.SSHForwarder.reverse_listen = {{"default": ["127.0.0.1:{rport}"]}}
"""


class Site:
    """An Outpost process (``outpost_process(..., name=name)``) with an outpost_config.py
    made from ``config`` and ``extra``, and -- with ``ssh`` -- its SSH forwarder and a key
    pair for the hub.

    ``config`` is a ``str.format`` template; it gets ``site`` (the name), ``ip``,
    ``allow_plaintext``, ``workdir`` (the Outpost's), ``bin`` (the venv's scripts),
    ``python`` and ``fields``. ``ip`` other than 127.0.0.1 (with ``netns``: the process runs
    in that network namespace) is passed as ``--ip``.
    """

    def __init__(
        self, outpost_process, tmp_path: Path, name: str, *, config: str = SITE_CONFIG, ssh: bool = True,
        ip: str = "127.0.0.1", netns: str | None = None, extra: str = "", **fields,
    ):  # fmt: skip
        self.name = name
        self.ip = ip
        self.netns = netns
        self.op = outpost_process("", name=name)
        self.op.netns = netns
        self.op.readiness_check = True  # real notebooks: the Outpost's default
        text = config.format(
            site=name, ip=ip, allow_plaintext=ip != "127.0.0.1", workdir=self.op.workdir, bin=BIN,
            python=sys.executable, **fields,
        )  # fmt: skip
        self.ssh = ssh
        if ssh:
            self.ssh_port = free_port()
            self.rport = free_port()  # the hub API's reverse forward, at the site
            keydir = tmp_path / f"{name}-hubkey"
            keydir.mkdir()
            key = asyncssh.generate_private_key("ssh-ed25519")
            self.hub_key = keydir / "id_ed25519"
            self.hub_key.write_bytes(key.export_private_key())
            self.hub_key.chmod(0o600)
            self.known_hosts = keydir / "known_hosts"
            text += FORWARDER_CONFIG.format(
                ip=ip, ssh_port=self.ssh_port, workdir=self.op.workdir,
                hub_pub=key.export_public_key().decode().strip(), rport=self.rport,
            )  # fmt: skip
        self.op.config.write_text(text + extra)
        self._client: OutpostClient | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.ip}:{self.op.port}"

    async def start(self) -> None:
        """Start the Outpost; wait until it serves (not in a namespace: nothing here may
        reach it) and, with ``ssh``, until its SSH host key is written (into known_hosts)."""
        self.op.start(*(["--ip", self.ip] if self.ip != "127.0.0.1" else []))
        if self.netns is None:
            await self.op.wait_serving()
        if self.ssh:
            host_pub = self.op.workdir / "ssh_host_key.pub"
            await wait_for(host_pub.exists, timeout=30, message=f"no SSH host key:\n{self.op.tail(2000)}")
            self.known_hosts.write_text(f"[{self.ip}]:{self.ssh_port} {host_pub.read_text().strip()}\n")

    # --- what a hub needs --------------------------------------------------------------------

    def hub_config(self, prefix: str = "c.OutpostSpawner.") -> str:
        """jupyterhub_config.py lines for OutpostSpawner: this site, through its forwarder."""
        return "\n".join(
            [
                f'{prefix}outpost_address = "{self.grpc_address}"',
                f'{prefix}ssh_host = "{self.ip}"',
                f"{prefix}ssh_port = {self.ssh_port}",
                f'{prefix}ssh_key = "{self.hub_key}"',
                f'{prefix}ssh_known_hosts = "{self.known_hosts}"',
                f"{prefix}hub_api_forward = True",
                f"{prefix}hub_api_site_port = {self.rport}",
                "",
            ]
        )

    def outposts_entry(self) -> dict:
        """This site as an entry of ``OutpostSpawner.outposts``."""
        return {
            "address": self.grpc_address,
            "ssh_host": self.ip,
            "ssh_port": self.ssh_port,
            "ssh_key": str(self.hub_key),
            "ssh_known_hosts": str(self.known_hosts),
            "hub_api_forward": True,
            "hub_api_site_port": self.rport,
        }

    # --- looking at the site ------------------------------------------------------------------

    @property
    def client(self) -> OutpostClient:
        """One client of this Outpost for the whole test (made at first use; ``close()``)."""
        if self._client is None:
            self._client = OutpostClient(self.grpc_address, timeout=30)
        return self._client

    async def servers(self) -> dict:
        """The Outpost's servers by name (ListServers on a channel of its own: the Outpost
        may have restarted since the last call)."""
        async with OutpostClient(self.grpc_address) as client:
            return {s.server_name: s for s in await client.list_servers()}

    def stored(self, server_name: str, column: str) -> str:
        """A column of the server's row in the Outpost's SQLite database, as stored."""
        db = sqlite3.connect(self.op.workdir / "outpost.sqlite")
        try:
            (value,) = db.execute(
                f"select {column} from outpost_servers where server_name=?", (server_name,)  # noqa: S608
            ).fetchone()
        finally:
            db.close()
        return value

    def stored_env(self, server_name: str) -> dict[str, str]:
        """The env the hub sent with the start, as the Outpost stored it (decrypted with the
        key the Outpost process has)."""
        env, _ = Crypt([outpost_env(self.op.env)["OUTPOST_CRYPT_KEY"]]).decrypt(
            json.loads(self.stored(server_name, "env"))
        )
        return env

    async def stop_all(self) -> None:
        """Stop every notebook this Outpost runs (tests must not leave processes behind)."""
        if self.op.proc is None or self.op.proc.poll() is not None:
            return
        try:
            async with OutpostClient(self.grpc_address, timeout=30) as client:
                for server in await client.list_servers():
                    await client.stop(server.server_name)
        except Exception as e:  # the test's own failure is the interesting one
            print(f"cleanup of {self.name} failed: {e}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
