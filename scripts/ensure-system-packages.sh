#!/usr/bin/env bash
# Install the Debian packages the test suite needs (real components, started by the
# tests themselves): OpenSSH's server for the tunnel tests, nftables and iproute2 for the
# network-namespace tests, Slurm and munge for the BatchSpawner tests (tests/harness/slurm.py starts
# a private cluster; the packages start no daemons), Chromium and its driver for the browser
# tests (tests/harness/browser.py drives it headless with selenium), sudo for tests/test_systemd.py
# (sudo under systemd's NoNewPrivileges), Docker's engine and debootstrap for the container
# test (tests/harness/docker.py starts a private dockerd and builds the image's base from
# Debian packages; the install starts no daemon we use). Installs only what is
# missing; needs root (CI runs as root).
set -euo pipefail
packages=(openssh-server openssh-client nftables iproute2 slurm-wlm munge chromium chromium-driver sudo docker.io debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "warning: not root; cannot install ${missing[*]} (the tests that need them will skip or fail)" >&2
  exit 0
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
