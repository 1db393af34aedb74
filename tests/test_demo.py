"""`make demo`'s Outpost config and the grpcurl commands it prints, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request

import pytest

from .conftest import BIN, ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


def printed_commands() -> list[str]:
    """The grpcurl lines demo/run.sh prints (before it starts the Outpost)."""
    script = (ROOT / "demo" / "run.sh").read_text()
    text = script.split("cat <<TXT", 1)[1].split("\nTXT", 1)[0]
    lines = [line.strip().replace("\\$", "$") for line in text.splitlines()]
    return [line for line in lines if line.startswith(("$G", "curl"))]


def run(cmd: str, port: int) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        G=f"{BIN}/grpcurl -plaintext",
        A=f"127.0.0.1:{port}",
        S="jupyterhub.outpost.v1.OutpostService",
    )
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


async def test_demo_commands_work_as_printed(tmp_path):
    commands = printed_commands()
    assert len(commands) >= 7
    port = free_port()
    env = dict(os.environ, OUTPOST_DEMO_DATA=str(tmp_path))
    log = open(tmp_path / "outpost.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "jupyterhub-outpost"), "-f", str(ROOT / "demo" / "outpost_config.py"), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        await wait_for(lambda: run(commands[0], port).returncode == 0, timeout=30)
        outputs = {}
        for cmd in commands:
            if cmd.startswith("curl"):
                # the notebook takes a moment to listen after READY; a person is slower
                out = await wait_for(
                    lambda: (r := run(cmd, port)).returncode == 0 and '"started"' in r.stdout and r,
                    timeout=30,
                )
            else:
                out = await asyncio.to_thread(run, cmd, port)
            assert out.returncode == 0, (cmd, out.stderr)
            outputs[cmd] = out.stdout

        def output(suffix: str) -> str:
            return next(v for k, v in outputs.items() if k.endswith(suffix))

        assert json.loads(output("/Start"))["created"] is True
        assert "EVENT_KIND_READY" in output("/Events")
        poll = json.loads(output("/Poll"))
        assert poll["status"]["state"] == "SERVER_STATE_RUNNING"
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
