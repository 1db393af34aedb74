"""The spawn form in a real browser: headless Chromium (tests/harness/browser.py) on a real
JupyterHub with the real proxy, two real Outposts behind it (each with its SSH forwarder
and real jupyterhub-singleuser notebooks), each with flavors of its own.

A person logs in, reads both systems and their flavors with the live usage, picks one and
lands in the notebook; another, whose form still offered that flavor, picks it once it is
full and reads the Outpost's refusal on the spawn page; the form shown again says it is
full and offers it no more."""

from __future__ import annotations

import asyncio

import pytest

from .harness.browser import Browser, browser_unavailable

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable())),
]

# Hub, proxy, tunnel and notebooks share this host's ephemeral ports: a notebook's port
# that JupyterHub's random_port() picked (bind 0, close) was once handed to the hub's tunnel
# listener (bind 0 too) before the notebook bound it ("port ... is not available"). Here
# the notebooks take ports outside the kernel's ephemeral range (32768-60999), as a site's
# notebooks on another host would never meet the hub's.
NOTEBOOK_PORTS = """
import random
import socket

from traitlets import default


class FlavorSiteSpawner(SiteSpawner):
    @default("port")
    def _port_outside_ephemeral_range(self):
        for port in random.sample(range(20000, 30000), 500):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        return 0


c.Outpost.spawner_class = FlavorSiteSpawner
"""

SITE_A_FLAVORS = NOTEBOOK_PORTS + """
c.Outpost.flavors = {
    "small": {"display_name": "Small: 1 CPU, 2 GB", "description": "For notebooks and teaching.",
              "max_total": 8, "max_runtime": 8 * 3600, "default": True, "weight": 1},
    "solo": {"display_name": "Solo: the whole node", "description": "One at a time.",
             "max_total": 1, "max_runtime": 3600, "weight": 2},
}
"""
SITE_B_FLAVORS = NOTEBOOK_PORTS + """
c.Outpost.flavors = {
    "gpu": {"display_name": "GPU: 1 A100", "description": "Bring your CUDA.", "max_total": 2, "max_runtime": 7200},
}
"""


async def test_pick_a_flavor_land_in_the_notebook_and_read_why_a_full_one_is_refused(
    make_site, hub_factory, tmp_path
):
    a, b = await asyncio.gather(
        make_site("site-a", extra=SITE_A_FLAVORS), make_site("site-b", extra=SITE_B_FLAVORS)
    )
    hub = hub_factory(
        a.hub_config()
        + f"c.OutpostSpawner.outposts = {{'gpu': {b.outposts_entry()!r}}}\n"
        + 'c.OutpostSpawner.outpost_display_names = {"default": "Cluster A", "gpu": "GPU site B"}\n'
    )
    hub.start()
    await hub.wait_ready()
    shots = tmp_path / "screenshots"

    def form_of(user: str, browser: Browser) -> None:
        browser.login(hub.url, user)
        browser.open(f"{hub.url}/hub/spawn")
        browser.wait(lambda d: browser.css_all("input[name=outpost_flavor]"), f"{user} got no spawn form")

    def flavor_row(browser: Browser, value: str) -> str:
        radio = browser.css(f'input[name=outpost_flavor][value="{value}"]')
        return radio.find_element("xpath", "..").text

    loop = asyncio.get_running_loop()
    site_a = a.client  # made on this loop, called from the browser's thread

    def outpost_says(user: str, flavor: str) -> str:
        """Why the Outpost would not start flavor for user now (ListFlavors' sentence)."""
        answer = asyncio.run_coroutine_threadsafe(site_a.list_flavors(user), loop).result(30)
        (listed,) = [f for f in answer.flavors if f.name == flavor]
        assert not listed.available and listed.unavailable_reason, listed
        return listed.unavailable_reason

    def run():
        with Browser(shots / "carol") as carol, Browser(shots / "alice") as alice:
            # carol opens the form first: every flavor is free
            form_of("carol", carol)
            page = carol.text
            for words in ("Cluster A", "GPU site B", "Small: 1 CPU, 2 GB", "For notebooks and teaching.",
                          "0 of 8 in use", "up to 8 h", "Solo: the whole node", "0 of 1 in use", "up to 1 h",
                          "GPU: 1 A100", "0 of 2 in use", "up to 2 h"):  # fmt: skip
                assert words in page, (words, page)
            assert carol.css('input[value="default/small"]').is_selected()  # the site's default
            assert carol.css('input[value="default/solo"]').is_enabled()
            carol.shot("form")

            # alice picks the one-at-a-time flavor and lands in her notebook
            form_of("alice", alice)
            alice.css('input[value="default/solo"]').click()
            alice.css("#spawn_form button[type=submit]").click()
            alice.wait_url(f"{hub.url}/user/alice/")
            alice.shot("notebook")
            # jupyterhub-singleuser's own page (jupyter-server's; JupyterLab's where installed),
            # through the proxy and the tunnel, after the notebook's OAuth with the hub
            alice.wait(lambda d: "A Jupyter Server is running" in alice.text or "JupyterLab" in d.title,
                       "alice never saw her notebook")  # fmt: skip

            # alice's own form, shown again, counts her server: live usage, and full now
            alice.open(f"{hub.url}/hub/spawn/alice/second")
            alice.wait_text("1 of 1 in use")
            assert not alice.css('input[value="default/solo"]').is_enabled()
            alice.shot("form-full")

            # carol's form still offers it; she picks it and reads the Outpost's refusal
            sentence = outpost_says("carol", "solo")
            carol.css('input[value="default/solo"]').click()
            carol.css("#spawn_form button[type=submit]").click()
            carol.wait_text(sentence)
            carol.shot("refused")
            assert "Traceback" not in carol.text and "solo" in sentence, sentence

            # the form shown again offers it no more, and says why
            carol.open(f"{hub.url}/hub/spawn")
            carol.wait(lambda d: carol.css_all("input[name=outpost_flavor]"), "carol got no form again")
            assert not carol.css('input[value="default/solo"]').is_enabled()
            row = flavor_row(carol, "default/solo")
            assert "1 of 1 in use" in row and sentence in row, row
            carol.shot("form-again")

            # a POST of no choice at all (the page's radios unset by a script) is refused
            # with a sentence above the form, and nothing starts
            carol.driver.execute_script(
                "document.querySelectorAll('input[name=outpost_flavor]').forEach(e => e.checked = false)"
            )
            carol.css("#spawn_form button[type=submit]").click()
            carol.wait_text("Choose one of the offered systems and flavors, then Start.")
            assert "HTTP 400" not in carol.text and carol.css_all("input[name=outpost_flavor]")

    await asyncio.to_thread(run)

    r = await hub.get("/user/alice/api/status")  # the same notebook, from the hub's side
    assert r.status_code == 200, (r.status_code, hub.tail())
    model = await hub.server_model("alice")
    assert model and model["ready"] and model["user_options"] == {"outpost": "default", "flavor": "solo"}, model
    servers = await a.servers()
    assert set(servers) == {"alice"} and servers["alice"].flavor == "solo", servers
    assert 20000 <= servers["alice"].address.port < 30000
    assert not await b.servers()
    assert not (await hub.server_model("carol") or {}).get("ready")
