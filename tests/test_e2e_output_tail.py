"""End to end: the notebook's last words through a real JupyterHub (and proxy) to its
progress stream (the spawn page's) and its log, from a real local notebook process at an
Outpost process (tests/test_output_tail.py covers the Outpost and OutpostSpawner alone;
tests/test_slurm.py the batch job's output file)."""

from __future__ import annotations

import html

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# the site's Spawner: JupyterHub's SimpleLocalProcessSpawner whose start fails when the
# notebook exits early (outpost_server.testing); its notebook fails at once
FAILING_SITE = """
c.Outpost.spawner_class = "outpost_server.testing.CheckedLocalProcessSpawner"
c.CheckedLocalProcessSpawner.cmd = ["/bin/sh", "-c", "echo 'known line <b>1</b>'; echo \\"token=$JUPYTERHUB_API_TOKEN\\"; exit 3"]
"""


async def test_output_tail_on_the_hubs_spawn_page_and_log(make_site, hub_factory):
    site = await make_site("site-a", extra=FAILING_SITE)
    hub = hub_factory(site.hub_config())
    hub.start()
    await hub.wait_ready()
    events = await hub.spawn("alice")
    failed = events[-1]
    assert failed.get("failed"), (events, hub.tail())
    # the spawn page: the message, then the output as text (escaped), the token redacted
    assert "The notebook exited with status 3 while it started." in failed["message"], failed
    assert failed["message"].endswith("known line <b>1</b>\ntoken=[secret]"), failed
    assert "<pre" in failed.get("html_message", ""), failed
    assert html.escape("known line <b>1</b>") in failed["html_message"], failed
    assert "<b>1</b>" not in failed["html_message"]
    # the hub's log: each line of the output indented under its heading
    log = hub.log.read_text()
    assert "Last output of" in log and "    known line <b>1</b>" in log and "    token=[secret]" in log, hub.tail()
