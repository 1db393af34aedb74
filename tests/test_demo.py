"""`make demo`'s Outpost config and the grpcurl commands it prints, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from .harness.outpost import BIN, ROOT, run_outpost
from .harness.util import free_port, port_open, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def printed_commands() -> list[str]:
    """The grpcurl lines demo/run.sh prints (before it starts the Outpost)."""
    script = (ROOT / "demo" / "run.sh").read_text()
    text = script.split("cat <<TXT", 1)[1].split("\nTXT", 1)[0]
    lines = [line.strip().replace("\\$", "$") for line in text.splitlines()]
    return [line for line in lines if line.startswith(("$G", "curl"))]


def grpcurl_as_demo_hub(certs: Path) -> str:
    """What demo/run.sh prints as $G: grpcurl over mTLS with the demo hub's certificate."""
    return (
        f"{BIN}/grpcurl -cacert {certs}/outpost-ca/outpost-ca.crt"
        f" -cert {certs}/default/default.crt -key {certs}/default/default.key"
    )


def generate_demo_certs(data: Path) -> Path:
    """The certificates demo/run.sh makes, made the same way."""
    certs = data / "certs"
    run_outpost(
        "generate-certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost", "--hub", "default",
        check=True, timeout=60,
    )
    return certs


def run(cmd: str, port: int, certs: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        G=grpcurl_as_demo_hub(certs),
        A=f"127.0.0.1:{port}",
        S="jupyterhub.outpost.v1.OutpostService",
    )
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


async def test_demo_commands_work_as_printed(tmp_path):
    commands = printed_commands()
    assert len(commands) >= 7
    certs = generate_demo_certs(tmp_path)
    port = free_port()
    env = dict(os.environ, OUTPOST_DEMO_DATA=str(tmp_path))
    log = open(tmp_path / "outpost.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "jupyterhub-outpost"), "-f", str(ROOT / "demo" / "outpost_config.py"), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        await wait_for(lambda: run(commands[0], port, certs).returncode == 0, timeout=30)
        outputs = {}
        for cmd in commands:
            if cmd.startswith("curl"):
                # the notebook takes a moment to listen after READY; a person is slower
                out = await wait_for(
                    lambda: (r := run(cmd, port, certs)).returncode == 0 and '"started"' in r.stdout and r,
                    timeout=30,
                )
            else:
                out = await asyncio.to_thread(run, cmd, port, certs)
            assert out.returncode == 0, (cmd, out.stderr)
            outputs[cmd] = out.stdout

        def output(suffix: str) -> str:
            return next(v for k, v in outputs.items() if k.endswith(suffix))

        # the demo's two flavors, as a spawn form reads them: "small" the default, "large"
        # with a total of 2 (the refusal a newcomer can provoke)
        listed = json.loads(output("/ListFlavors"))
        flavors = {f["name"]: f for f in listed["flavors"]}
        assert list(flavors) == ["small", "large"]
        assert listed["default_flavor"] == "small"
        assert flavors["large"]["max_total"] == 2
        assert flavors["small"]["max_per_user"] == 3
        assert all(f["available"] and f["display_name"] for f in flavors.values())
        assert json.loads(output("/Start"))["created"] is True
        assert "EVENT_KIND_READY" in output("/Events")
        assert "8 h limit of flavor small" in output("/Events")
        poll = json.loads(output("/Poll"))
        assert poll["status"]["state"] == "SERVER_STATE_RUNNING"
        assert poll["status"]["flavor"] == "small" and poll["status"]["end_time"]  # 8 h after its start
        # the curl line reached the real Jupyter server under the prefix, with the token
        assert json.loads(output("/api/status"))["connections"] == 0
        assert "STOP_OUTCOME_STOPPED" in output("/Stop")
        port_nb = poll["status"]["address"]["port"]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port_nb}/user/alice/api/status", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


async def test_make_demo_hub_spawns_through_outpost(tmp_path):
    """demo/run.sh (what `make demo` runs): log in with any name at 127.0.0.1:8000 and the
    spawn form shows the demo Outpost's two flavors with their usage; once "large" has its
    2 servers, the form says it is full and a start of it anyway is refused with the
    Outpost's sentence; a start of "small" through the form goes through the Outpost, its
    progress shows the Outpost's message and the runtime's end, and the user lands in a
    running server reached through the tunnel."""
    import re
    import signal

    import requests

    from outpost_client import OutpostClient, TLSConfig

    busy = [p for p in (8000, 8081, 50051, 2222, 18081) if port_open(p)]
    if busy:
        pytest.skip(f"the demo's fixed ports are in use: {busy}")
    env = dict(os.environ, OUTPOST_DEMO_DATA=str(tmp_path))
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen(["bash", "demo/run.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    hub = "http://127.0.0.1:8000"
    certs = tmp_path / "certs"  # made by demo/run.sh: the demo runs with mTLS

    def demo_hub_client() -> OutpostClient:
        """The Outpost as the demo hub ("default"), as the printed grpcurl commands talk to it."""
        tls = TLSConfig(
            ca=str(certs / "outpost-ca" / "outpost-ca.crt"),
            cert=str(certs / "default" / "default.crt"),
            key=str(certs / "default" / "default.key"),
        )
        return OutpostClient("127.0.0.1:50051", tls=tls, timeout=30)

    try:
        def hub_up():
            try:
                return requests.get(f"{hub}/hub/api/", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        await wait_for(lambda: asyncio.to_thread(hub_up), timeout=60, interval=0.5,
                       message=(tmp_path / "demo.log").read_text()[-3000:])
        browser = requests.Session()

        def xsrf(page: str) -> str:
            """The page's xsrf token: a hidden field (login), or in the form's action (spawn)."""
            return re.search(r'(?:name="_xsrf"\s+value="|[?&]_xsrf=)([^"&]+)', page).group(1)

        def login() -> requests.Response:
            page = browser.get(f"{hub}/hub/login", timeout=10).text
            return browser.post(f"{hub}/hub/login", data={"username": "newcomer", "password": "x",
                                                          "_xsrf": xsrf(page)}, timeout=30)

        def form(path: str = "/hub/spawn") -> str:
            return browser.get(f"{hub}{path}", timeout=30).text

        def submit(path: str, choice: str, page: str) -> requests.Response:
            data = {"_xsrf": xsrf(page), "outpost_form": "1", "outpost_flavor": choice}
            return browser.post(f"{hub}{path}", data=data, timeout=60)

        def progress(server: str = "") -> list[str]:
            path = f"server/{server}" if server else "server"
            with browser.get(f"{hub}/hub/api/users/newcomer/{path}/progress", stream=True, timeout=60,
                             headers={"X-XSRFToken": browser.cookies.get("_xsrf", "")}) as resp:
                return [line for line in resp.iter_lines(decode_unicode=True) if line.startswith("data:")]

        r = await asyncio.to_thread(login)
        assert r.status_code == 200, r.status_code
        # the form: both flavors, what they are, their usage and runtime; small checked
        page = await asyncio.to_thread(form)
        for words in ("Demo Outpost (127.0.0.1:50051)", "Small: 1 CPU, 1 GB, 8 hours",
                      "The default. Up to 3 per user.", "up to 8 h", "Large: 2 CPU, 2 GB, 30 minutes",
                      "0 of 2 in use", "up to 30 min"):  # fmt: skip
            assert words in page, (words, page[-3000:])
        assert re.search(r'value="default/small"[^>]*checked', page), page[-3000:]

        # two others take "large" (started by hand as the demo hub, like the printed commands)
        async with demo_hub_client() as client:
            for i in (1, 2):
                await client.start(
                    f"fill-{i}", f"fill-{i}", user_name=f"other{i}", flavor="large",
                    env={"JUPYTERHUB_API_TOKEN": f"fill-token-{i}", "JUPYTERHUB_SERVICE_PREFIX": f"/user/other{i}/"},
                )
        # the form shown again: full, not offered, and why
        page = await asyncio.to_thread(form, "/hub/spawn/newcomer/big")
        assert "2 of 2 in use" in page and "All 2 servers of flavor &#x27;large&#x27; are in use" in page, page[-3000:]
        assert re.search(r'value="default/large"[^>]*disabled', page), page[-3000:]
        # chosen anyway (a form shown before it filled up): the Outpost refuses, and says why
        r = await asyncio.to_thread(submit, "/hub/spawn/newcomer/big", "default/large", page)
        refusal = r.text if "are in use" in r.text else "\n".join(await asyncio.to_thread(progress, "big"))
        assert "All 2 servers of flavor" in refusal and "are in use" in refusal, refusal[-3000:]

        # small through the form: the Outpost's progress, the end of its runtime, the notebook
        page = await asyncio.to_thread(form)
        r = await asyncio.to_thread(submit, "/hub/spawn", "default/small", page)
        assert r.status_code == 200, r.status_code
        events = await asyncio.to_thread(progress)
        assert any("Demo Outpost" in e for e in events), events
        assert any("8 h limit of flavor small" in e for e in events), events

        def status():
            # the page first (the notebook's OAuth through the hub), as a browser does
            # (a page that needs a login whatever extensions the notebook has; its status,
            # 404 for this file, is not what this tests)
            browser.get(f"{hub}/user/newcomer/files/outpost-oauth-check.txt", timeout=30)
            return browser.get(f"{hub}/user/newcomer/api/status", timeout=10).status_code

        async def ready():
            return await asyncio.to_thread(status) == 200

        await wait_for(ready, timeout=60, interval=0.5, message="the notebook did not answer through the proxy")
    finally:
        try:
            async with demo_hub_client() as client:
                for server in await client.list_servers():
                    await client.stop(server.server_name)
        except Exception as e:
            print("demo cleanup:", e)
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)
        log.close()
