"""A private OpenSSH server for the tunnel tests (the ``sshd_server`` fixture) and the tunnel
benchmark.

Debian's ``openssh-server`` (``scripts/ensure-system-packages.sh``) run as
``/usr/sbin/sshd -D -e -f <dir>/sshd_config`` on 127.0.0.1 and a free port, with its own
host key, pid file and ``authorized_keys_%u`` in a temp dir, for one local user (created
with ``useradd`` if missing; needs root). Keys are made with asyncssh.

    sshd = PrivateSSHD()
    key = sshd.add_client_key("hub", options='restrict,port-forwarding,permitopen="127.0.0.1:8888"')
    sshd.start()          # waits until the port accepts connections
    ...                   # sshd.port, sshd.known_hosts, key (a private key file path)
    sshd.kill_connections()   # SIGKILL every per-connection sshd (the connections drop)
    sshd.stop()           # connections and listener, by PID (start() again: same port)
    sshd.close()          # stop() and remove the files

The files live in a directory of their own (mode 0755, not under pytest's 0700 tmp_path):
sshd reads ``authorized_keys`` as the logged-in user. Every process is stopped by its PID;
nothing is left behind by ``stop()``.
"""

from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import asyncssh

from .procs import descendants_of, process_alive, stop_process
from .util import free_port

SSHD = "/usr/sbin/sshd"
DEFAULT_USER = "outpost-tunnel"


def ensure_user(name: str = DEFAULT_USER) -> None:
    """Create the local account sshd logs in as (unlocked: a '!' password is refused)."""
    try:
        import pwd

        pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, text=True)
        if r.returncode not in (0, 9):  # 9: created meanwhile by someone else
            raise RuntimeError(f"useradd {name} failed: {r.stderr.strip()}") from None
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)


class PrivateSSHD:
    """One private sshd (a subprocess) on 127.0.0.1; see the module docstring."""

    def __init__(self, user: str = DEFAULT_USER, port: int | None = None, extra_config: str = ""):
        """extra_config: sshd_config lines (e.g. "Ciphers ...\n", "RekeyLimit 1M\n")."""
        ensure_user(user)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        self.dir = Path(tempfile.mkdtemp(prefix="outpost-sshd-"))
        os.chmod(self.dir, 0o755)
        self.user = user
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "sshd.log"
        self.host_key_path = self.dir / "host_ed25519"
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key.write_private_key(str(self.host_key_path))
        os.chmod(self.host_key_path, 0o600)
        self.authorized_keys = self.dir / f"authorized_keys_{user}"
        self.authorized_keys.write_text("")
        os.chmod(self.authorized_keys, 0o644)
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line(self.host_key))
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            extra_config  # first: sshd keeps the first value it reads for a keyword
            + f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key_path}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys_%u\n"
            "StrictModes no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "AllowTcpForwarding yes\n"
            f"AllowUsers {user}\n"
            "MaxStartups 100\n"
            "LogLevel VERBOSE\n"
        )

    def known_hosts_line(self, key: asyncssh.SSHKey) -> str:
        public = key.export_public_key("openssh").decode().split()
        return f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n"

    def add_client_key(self, name: str, options: str = "") -> Path:
        """A new client key pair in the work dir, authorized with ``options``; its private path."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        path = self.dir / f"client_{name}"
        key.write_private_key(str(path))
        os.chmod(path, 0o600)
        public = key.export_public_key("openssh").decode().strip()
        with open(self.authorized_keys, "a") as f:
            f.write(f"{options} {public}\n" if options else f"{public}\n")
        return path

    # --- processes -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the listener and wait until its port accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        logf = open(self.log, "a")
        try:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            )
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd not listening after {timeout}s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener and theirs)."""
        return descendants_of(self.pid) if self.pid else []

    def kill_connections(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every per-connection sshd: the clients' TCP connections are closed."""
        pids = self.connection_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(process_alive(p) for p in pids):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return pids

    def stop(self) -> None:
        """Kill the connections, then the listener (SIGTERM, SIGKILL after 5 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill_connections()
            stop_process(self.proc, 5)

    def close(self) -> None:
        """stop() and remove the directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateSSHD:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
