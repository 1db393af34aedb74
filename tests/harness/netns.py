"""Two test hosts as network namespaces: "hub" and "site", joined by a veth pair.

Recipe and safety rule from ../shared/TESTBED.md: nothing is ever sent to a namespace
address from the root namespace (its default route leaves the machine); both ends always
run inside namespaces, and the route between them is checked before any traffic.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

HUB_IP = "10.200.0.1"
SITE_IP = "10.200.0.2"


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("/usr/sbin/ip", "/usr/sbin/nft"):
        if not os.path.exists(tool) and not os.path.exists(tool.replace("/usr/sbin", "/sbin")):
            return f"{tool} missing (make setup installs iproute2 and nftables)"
    return None


@dataclass
class Namespaces:
    hub: str
    site: str

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


@contextmanager
def hub_and_site(outbound_only: bool = True):
    """Create the namespaces (unique per process), yield them, always delete them."""
    suffix = f"{os.getpid() % 100000}"
    ns = Namespaces(hub=f"op-hub-{suffix}", site=f"op-site-{suffix}")
    veth_hub, veth_site = f"vh{suffix}", f"vs{suffix}"
    try:
        _run("ip", "netns", "add", ns.hub)
        _run("ip", "netns", "add", ns.site)
        _run("ip", "link", "add", veth_hub, "type", "veth", "peer", "name", veth_site)
        _run("ip", "link", "set", veth_hub, "netns", ns.hub)
        _run("ip", "link", "set", veth_site, "netns", ns.site)
        _run("ip", "-n", ns.hub, "addr", "add", f"{HUB_IP}/24", "dev", veth_hub)
        _run("ip", "-n", ns.site, "addr", "add", f"{SITE_IP}/24", "dev", veth_site)
        for name, dev in ((ns.hub, veth_hub), (ns.site, veth_site)):
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "-n", name, "link", "set", dev, "up")
        # safety: traffic between the two must stay on the veth pair
        route = _run("ip", "-n", ns.hub, "route", "get", SITE_IP)
        assert veth_hub in route, f"route from hub to site does not use {veth_hub}: {route}"
        route = _run("ip", "-n", ns.site, "route", "get", HUB_IP)
        assert veth_site in route, f"route from site to hub does not use {veth_site}: {route}"
        if outbound_only:
            nft = ["ip", "netns", "exec", ns.hub, "nft"]
            _run(*nft, "add", "table", "inet", "hubfw")
            _run(*nft, "add chain inet hubfw input { type filter hook input priority 0; policy accept; }")
            _run(*nft, "add", "rule", "inet", "hubfw", "input", "ct", "state", "established,related", "accept")
            _run(*nft, "add", "rule", "inet", "hubfw", "input", "iifname", veth_hub, "ip", "saddr", SITE_IP,
                 "ct", "state", "new", "drop")
        yield ns
    finally:
        for name in (ns.hub, ns.site):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
