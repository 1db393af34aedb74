"""The systemd units (deploy/systemd/): `systemd-analyze verify` accepts both; the unit for
Spawners that use sudo sets nothing that implies NoNewPrivileges (which would break every
`sudo -u`, as the real sudo shows here), the strict one sets it; both keep notebooks
running through a restart and keep the database key out of the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .harness.outpost import ROOT

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
    docs = (ROOT / "docs" / "deploy.md").read_text().split("\n## systemd\n", 1)[1]
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
