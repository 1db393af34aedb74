"""The systemd units (deploy/systemd/): `systemd-analyze verify` accepts both; the unit for
Spawners that use sudo sets nothing that implies NoNewPrivileges (which would break every
`sudo -u`, as the real sudo shows here), the strict one sets it; both keep notebooks
running through a restart and keep the database key out of the environment."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from .harness.outpost import OUTPOST_BIN, ROOT, outpost_env
from .harness.util import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UNITS = ROOT / "deploy" / "systemd"
SUDO_UNIT = UNITS / "jupyterhub-outpost.service"
STRICT_UNIT = UNITS / "strict" / "jupyterhub-outpost.service"
INSTALLED_BIN = "/opt/jupyterhub-outpost/bin/jupyterhub-outpost"

# options that make systemd set no_new_privs for a service that is not root
# (systemd.exec(5), NoNewPrivileges=)
IMPLY_NO_NEW_PRIVILEGES = {
    "NoNewPrivileges", "SystemCallFilter", "SystemCallArchitectures", "RestrictAddressFamilies",
    "RestrictNamespaces", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectClock", "MemoryDenyWriteExecute", "RestrictRealtime",
    "RestrictSUIDSGID", "LockPersonality", "DynamicUser",
}  # fmt: skip


def service_options(path: Path) -> dict[str, list[str]]:
    """The [Service] section: option -> its values (an option may repeat)."""
    options: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


@pytest.mark.parametrize("unit", [SUDO_UNIT, STRICT_UNIT], ids=["sudo", "strict"])
def test_systemd_analyze_verify_accepts_the_unit(unit, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    # verify checks that ExecStart's program exists: point it at this checkout's console script
    console_script = Path(sys.executable).with_name("jupyterhub-outpost")
    assert console_script.exists()
    text = unit.read_text()
    assert INSTALLED_BIN in text
    copy = tmp_path / "jupyterhub-outpost.service"
    copy.write_text(text.replace(INSTALLED_BIN, str(console_script)))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "jupyterhub-outpost.service" not in out.stderr, out.stderr  # no warning about the unit


def test_sudo_unit_sets_nothing_that_implies_no_new_privileges():
    options = service_options(SUDO_UNIT)
    assert options["User"] != ["root"]
    assert not IMPLY_NO_NEW_PRIVILEGES & set(options), "sudo -u fails under no_new_privs"
    assert "CapabilityBoundingSet" not in options  # sudo needs CAP_SETUID/CAP_SETGID
    assert options["ProtectSystem"] == ["full"] and options["PrivateTmp"] == ["yes"]


def test_strict_unit_has_no_new_privileges_and_no_capabilities():
    options = service_options(STRICT_UNIT)
    assert options["NoNewPrivileges"] == ["yes"]
    assert options["CapabilityBoundingSet"] == [""]
    assert options["ProtectSystem"] == ["strict"] and options["ProtectHome"] == ["yes"]
    assert options["User"] != ["root"]


@pytest.mark.parametrize("unit", [SUDO_UNIT, STRICT_UNIT], ids=["sudo", "strict"])
def test_units_keep_notebooks_and_the_key_safe(unit):
    options = service_options(unit)
    # a restart signals only the Outpost: notebooks on this host keep running (restored)
    assert options["KillMode"] == ["process"]
    # the key arrives as a credential file, never in the environment sbatch inherits
    assert options["LoadCredential"] == ["crypt-key:/etc/jupyterhub-outpost/crypt-key"]
    assert "Environment" not in options and "EnvironmentFile" not in options
    assert options["StateDirectoryMode"] == ["0700"]
    assert options["WorkingDirectory"] == ["/var/lib/jupyterhub-outpost"]
    assert options["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # re-reads flavors_file
    # the docs' config reads the key from where LoadCredential puts it
    docs = (ROOT / "docs" / "deploy.md").read_text().split("\n## systemd\n", 1)[1].split("\n## ", 1)[0]
    assert 'c.Outpost.crypt_key_file = os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "crypt-key")' in docs


def test_sudo_works_without_no_new_privileges_and_fails_with_it():
    """Why the sudo unit has no NoNewPrivileges: the real sudo, as an unprivileged user with
    a sudoers rule, with and without the flag (setpriv sets it as systemd would)."""
    sudo, setpriv = shutil.which("sudo"), shutil.which("setpriv")
    if sudo is None or setpriv is None:
        pytest.skip("sudo or setpriv is not installed (scripts/ensure-system-packages.sh installs sudo)")
    if os.geteuid() != 0:
        pytest.skip("needs root to add a sudoers rule")
    rule = Path(f"/etc/sudoers.d/zz-outpost-test-{uuid.uuid4().hex[:8]}")
    rule.write_text("nobody ALL=(root) NOPASSWD: /usr/bin/true\n")
    rule.chmod(0o440)
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    command = [sudo, "-n", "-u", "root", "/usr/bin/true"]
    try:
        plain = subprocess.run(as_nobody + command, capture_output=True, text=True, timeout=30)
        nnp = subprocess.run(as_nobody + ["--no-new-privs"] + command, capture_output=True, text=True, timeout=30)
    finally:
        rule.unlink()
    assert plain.returncode == 0, plain.stderr
    assert nnp.returncode != 0
    assert "no new privileges" in nnp.stderr


async def test_first_run_config_of_the_docs_starts_an_outpost(tmp_path, pki):
    """docs/deploy.md's outpost_config.py for the unit, with its key where LoadCredential=
    puts it ($CREDENTIALS_DIRECTORY/crypt-key, a file of the service's own): the Outpost
    starts with it (mTLS, the forwarder, batchspawner's SlurmSpawner) and stops cleanly on
    SIGTERM. Only the machine's paths, ports, addresses and the placeholder SSH key are
    swapped for this test's."""
    import asyncssh

    docs = (ROOT / "docs" / "deploy.md").read_text().split("\n## systemd\n", 1)[1].split("\n## ", 1)[0]
    (config,) = re.findall(r"```python\n(.*?)```", docs, re.S)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "crypt-key").write_text(Fernet.generate_key().decode() + "\n")
    (credentials / "crypt-key").chmod(0o400)
    hub_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    port, ssh_port = free_port(), free_port()
    for old, new in [
        ("/etc/jupyterhub-outpost/tls/outpost-server.crt", pki.server.cert),
        ("/etc/jupyterhub-outpost/tls/outpost-server.key", pki.server.key),
        ("/etc/jupyterhub-outpost/tls/outpost-ca.crt", pki.ca.cert),
        ("ssh-ed25519 AAAA... hub-a", hub_key),
        ('"0.0.0.0"', '"127.0.0.1"'),
    ]:
        assert old in config
        config = config.replace(old, new)
    config += f"c.Outpost.port = {port}\nc.SSHForwarder.port = {ssh_port}\n"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = tmp_path / "outpost_config.py"
    path.write_text(config)
    env = outpost_env({"CREDENTIALS_DIRECTORY": str(credentials)})
    env.pop("OUTPOST_CRYPT_KEY", None)  # the unit has no key in the environment
    log = tmp_path / "outpost.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(OUTPOST_BIN), "-f", str(path)], cwd=state, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:

        def serving():
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()}")
            return "SSH forwarder listening" in log.read_text()

        await wait_for(serving, timeout=60, message="the Outpost did not start")
        assert f"on 127.0.0.1:{port} (mTLS, identity from CN) with SlurmSpawner" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
    assert returncode == 0, log.read_text()
    assert (state / "outpost.sqlite").exists() and (state / "outpost_ssh_host_key.pub").exists()
