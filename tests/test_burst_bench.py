"""The burst benchmark (benchmarks/burst_bench.py) runs end to end at a small size, and
bench.py's production method measures what a site runs: mTLS only, JupyterHub's Start
accepted by the Outpost's default-deny policies, pinned where asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench import StartShape
from benchmarks.common import BenchOutpost, hub_env
from outpost_client.client import OutpostClient
from outpost_client.errors import Unavailable

from .harness.outpost import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_burst_bench_smoke(tmp_path):
    """Two users at once per configuration, one burst each: every user ready, and the JSON
    carries the issue's keys (named after --users)."""
    out = tmp_path / "burst.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/burst_bench.py", "--users", "2", "--repeats", "1", "--settle", "0",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in (
        "burst2_direct_total_s", "burst2_outpost_total_s", "burst2_ratio", "burst2_outpost_p95_s",
        "burst2_failures", "burst2_hub_cpu_s_direct", "burst2_hub_cpu_s_outpost", "burst2_outpost_cpu_s",
    ):  # fmt: skip
        assert doc[key] is not None, key
    assert doc["burst2_failures"] == 0, doc["burst2_runs"]
    for label in ("direct", "outpost"):
        (run,) = doc["burst2_runs"][label]
        assert run["ready"] == 2 and len(run["spawn_to_ready_s"]) == 2, run
        assert run["total_s"] >= run["max_s"] > 0
        assert run["hub_cpu_s"] > 0 and run["hub_rss_peak_kib"] > 0
    assert doc["burst2_runs"]["outpost"][0]["outpost_cpu_s"] > 0
    assert doc["burst2_runs"]["direct"][0]["outpost_cpu_s"] is None
    assert doc["burst2_ratio"] == pytest.approx(doc["burst2_outpost_total_s"] / doc["burst2_direct_total_s"], rel=0.01)


async def test_burst_bench_production_method():
    """bench.py's default method: the Outpost serves mTLS only (a plaintext client gets
    nowhere), runs on the CPUs it was pinned to, logs at INFO, and accepts the Start a
    JupyterHub sends (its env and user options pass the default-deny policies)."""
    cpus = {min(os.sched_getaffinity(0))}
    outpost = BenchOutpost(method="production", cpus=cpus)
    try:
        outpost.launch()
        await outpost.wait_serving(30)
        assert "(mTLS" in outpost.tail()
        tasks = os.listdir(f"/proc/{outpost.proc.pid}/task")
        assert {t: os.sched_getaffinity(int(t)) for t in tasks} == {t: cpus for t in tasks}

        async with OutpostClient(outpost.address, timeout=5) as plaintext:
            with pytest.raises(Unavailable):  # the TLS handshake fails: no connection
                await plaintext.list_servers()

        shape = StartShape("production").kwargs("alice")
        assert len(shape["env"]) == 18 and shape["user_options"]
        async with outpost.client(10) as client:
            response = await client.start("bench-1", "sid-1", wait_until_ready=True, **shape)
            assert response.created
            (server,) = await client.list_servers()
            assert server.server_name == "bench-1"
        assert "bench-hub/bench-1 started" in outpost.tail()  # the hub named by its certificate, INFO
    finally:
        outpost.terminate()
        outpost.cleanup()


def test_burst_bench_hub_env_is_jupyterhubs():
    """The production Start's env is what JupyterHub's Spawner.get_env() gives a user's
    default server (OutpostSpawner's env_keep = []): token, OAuth, URLs."""
    env = hub_env("alice")
    assert env["JUPYTERHUB_USER"] == "alice"
    assert env["JUPYTERHUB_API_TOKEN"] == env["JPY_API_TOKEN"] and len(env["JUPYTERHUB_API_TOKEN"]) == 32
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/user/alice/"
    assert env["JUPYTERHUB_CLIENT_ID"] == "jupyterhub-user-alice"
    assert env["JUPYTERHUB_API_URL"] == "http://127.0.0.1:8082/hub/api"
    assert "PATH" not in env  # env_keep = []: nothing of the hub's own environment
    assert hub_env("alice")["JUPYTERHUB_API_TOKEN"] != env["JUPYTERHUB_API_TOKEN"]  # a fresh token per spawn
