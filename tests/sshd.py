"""A private OpenSSH server per test, for the hub-side tunnel (``outpost_client.tunnel``).

Import the fixture where it is used (``from .sshd import sshd_server``)::

    def test_x(sshd_server):
        sshd = sshd_server()                      # PrivateSSHD, not started yet
        key = sshd.add_client_key("hub", options='restrict,port-forwarding,permitopen="127.0.0.1:8888"')
        sshd.start()

The server is ``benchmarks/sshd_helper.py``'s :class:`PrivateSSHD` (the tunnel benchmark
uses the same one): ``/usr/sbin/sshd -D -e`` on 127.0.0.1 and a free port, its own host
key, ``authorized_keys_%u`` and pid file, one local user (``outpost-tunnel``, created if
missing; the tests run as root). Every server a test made is stopped by PID and its
directory removed after the test, and the test fails if an sshd process of it survived.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.sshd_helper import PrivateSSHD

from .conftest import process_alive

__all__ = ["PrivateSSHD", "sshd_server"]


@pytest.fixture
def sshd_server():
    """Factory: ``sshd_server(extra_config="", port=None)`` -> a new, not yet started PrivateSSHD."""
    if os.geteuid() != 0:
        pytest.skip("a private sshd for another user needs root")
    made: list[PrivateSSHD] = []

    def factory(**kwargs) -> PrivateSSHD:
        sshd = PrivateSSHD(**kwargs)
        made.append(sshd)
        return sshd

    yield factory
    left = []
    for sshd in made:
        pids = [sshd.pid, *sshd.connection_pids()] if sshd.pid else []
        sshd.close()
        left += [pid for pid in pids if process_alive(pid)]
    assert not left, f"sshd processes left behind: {left}"
