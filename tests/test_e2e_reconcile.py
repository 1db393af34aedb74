"""End to end: the hub's orphan reconciler with a real JupyterHub, the real proxy and a
real Outpost process running real notebooks (jupyterhub-singleuser).

A user is deleted through the hub's REST API while the Outpost is unreachable: the hub's
Stop fails, JupyterHub forgets the server anyway, and the notebook keeps running at the
site. Once the Outpost is back (same database), the reconciler stops it there, and only
it."""

from __future__ import annotations

import time

import pytest

from .harness.procs import children_of
from .harness.util import port_open, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INTERVAL = 1.0
GRACE = 5.0

RECONCILE_CONFIG = f"""
c.OutpostReconciler.interval = {INTERVAL}
c.OutpostReconciler.grace_period = {GRACE}
c.OutpostSpawner.outpost_retry_timeout = 2  # the hub's Stop gives up soon
"""


async def test_reconcile_stops_the_orphan_of_a_user_deleted_during_an_outage(subreaper, site, hub_factory):
    # subreaper first: it must outlive the teardown that stops the notebooks orphaned by the
    # Outpost's stop (a site's Outpost keeps its notebooks running through a restart)
    hub = hub_factory(site.hub_config() + RECONCILE_CONFIG)
    hub.start()
    await hub.wait_ready()
    for user in ("alice", "bob"):
        events = await hub.spawn(user)
        assert events[-1].get("ready"), (events, hub.tail())
    before = await site.servers()
    assert set(before) == {"alice", "bob"}
    assert "Outpost reconciler started for 1 Outpost(s): every 1s, grace period 5s" in hub.tail(50000)

    # the Outpost goes away; the user is deleted meanwhile: the hub's Stop cannot reach it
    subreaper.pids.update(children_of(site.op.proc.pid))
    site.op.stop()
    try:
        await _delete_alice_and_come_back(site, hub, before)
    finally:
        if site.op.proc.poll() is not None:  # failed during the outage: the site fixture's
            site.op.start()  # teardown stops the notebooks through the Outpost
            await site.op.wait_serving()


async def _delete_alice_and_come_back(site, hub, before):
    """While the Outpost is down: delete alice at the hub; then bring the Outpost back
    and watch the reconciler stop alice's server, and only it."""

    async def deleted():
        r = await hub.api("DELETE", "/users/alice")
        return r.status_code in (204, 404)

    await wait_for(deleted, timeout=60, interval=1, message=f"alice not deleted:\n{hub.tail()}")
    assert (await hub.api("GET", "/users/alice")).status_code == 404
    assert "Stop for alice" in hub.tail(50000)  # retried for outpost_retry_timeout, then given up

    # back, with the same database: alice's notebook still runs there, unknown to the hub
    site.op.start()
    await site.op.wait_serving()
    back = await site.servers()
    assert back["alice"].start_id == before["alice"].start_id
    assert port_open(before["alice"].address.port)
    returned = time.monotonic()

    async def alice_gone():
        return "alice" not in await site.servers()

    await wait_for(alice_gone, timeout=GRACE + 30 * INTERVAL, interval=0.5, message=f"orphan not stopped:\n{hub.tail()}")
    print(f"orphan stopped {time.monotonic() - returned:.1f}s after the Outpost came back (grace {GRACE:g}s)")
    await wait_for(lambda: not port_open(before["alice"].address.port), timeout=15, message="alice's notebook still listens")
    log = hub.tail(100000)
    assert "Reconcile of Outpost default stopped alice (STOP_OUTCOME_STOPPED): the hub has no such server (user 'alice'" in log

    # nothing else: bob's server is the same, running, and reachable through the hub
    after = await site.servers()
    assert set(after) == {"bob"}
    assert after["bob"].start_id == before["bob"].start_id
    r = await hub.get("/user/bob/api/status")
    assert r.status_code == 200, (r.status_code, hub.tail())
    assert "stopped bob" not in log and "would stop" not in log
