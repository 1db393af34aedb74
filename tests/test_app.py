"""The application: config, start-up errors, shutdown, grpcurl against a real process."""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from outpost_client import OutpostClient, pb

from .harness.outpost import grpcurl, one_line, run_outpost, stored_rows
from .harness.procs import children_of, process_alive, process_name
from .harness.util import notebook_account, wait_for

pytestmark = pytest.mark.rpc


def test_unknown_spawner_class_exits_with_one_line(tmp_path):
    out = run_outpost("--spawner-class", "nosuchmodule.NoSpawner", "--port", "0", cwd=tmp_path)
    assert "nosuchmodule.NoSpawner" in one_line(out)
    assert not (tmp_path / "outpost.sqlite").exists()


def test_unknown_spawner_class_in_config_file(tmp_path):
    (tmp_path / "outpost_config.py").write_text('c.Outpost.spawner_class = "not_a_spawner"\n')
    out = run_outpost("--port", "0", cwd=tmp_path)
    assert "not_a_spawner" in one_line(out), out.stderr


def test_plaintext_off_loopback_refused(tmp_path):
    out = run_outpost("--ip", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert out.returncode != 0
    assert "refusing to serve plaintext" in out.stderr and "--allow-plaintext" in out.stderr


def test_generate_config(tmp_path):
    out = run_outpost("--generate-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "outpost_config.py").read_text()
    assert "c.Outpost.spawner_class" in text and "c.Outpost.db_url" in text
    assert "LocalProcessSpawner" in text  # the hosted Spawner's options are documented too
    # and the generated file loads
    out = run_outpost("--generate-config", cwd=tmp_path)
    assert out.returncode == 1 and "not overwriting" in out.stderr


async def test_sigterm_finishes_rpcs_keeps_notebooks(start_outpost):
    async with start_outpost("outpost_server.testing.SlowSpawner", **{"SlowSpawner.delay": 1.0}) as op:
        channel = grpc.aio.insecure_channel(op.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await op.client.start("running", "r1", user_name="r", wait_until_ready=True)
        slow = asyncio.create_task(op.client.start("slow", "s1", user_name="s", wait_until_ready=True))
        await asyncio.sleep(0.2)
        op.app.shutdown_grace = 5
        cleanup = asyncio.create_task(op.app.cleanup())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream would hold the shutdown for its whole grace
        await channel.close()
        result = await slow  # the in-flight RPC finishes
        assert result.status.state == pb.SERVER_STATE_RUNNING
        await cleanup
        # running notebooks were not stopped by the shutdown
        assert not op.manager.records[("default", "running")].spawner.stopped
        rows = await stored_rows(op.app)
        assert {r["server_name"]: r["state"] for r in rows} == {"running": "running", "slow": "running"}


@pytest.mark.slow
async def test_sigterm_process_exits_cleanly_notebook_survives(tmp_path, outpost_process, subreaper):
    op = outpost_process(
        'c.Outpost.spawner_class = "localprocess"\n'
        'c.LocalProcessSpawner.cmd = ["/bin/sleep", "600"]\n'
    )
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        await client.start("keep", "k1", user_name=notebook_account(), wait_until_ready=True)
    # the notebook (the other child is its output capture, outpost_server/_capture.py)
    pid = next(p for p in children_of(op.proc.pid) if process_name(p) == "sleep")
    subreaper.pids.add(pid)
    assert op.kill(signal.SIGTERM) == 0
    assert "running notebooks keep running" in op.log.read_text()
    assert process_alive(pid)
    op.start()
    await op.wait_serving()
    async with OutpostClient(op.address) as client:
        assert (await client.poll("keep")).state == pb.SERVER_STATE_RUNNING
        await client.stop("keep")
    await wait_for(lambda: not process_alive(pid), timeout=15)


# --- grpcurl (the operator's tool), through reflection -------------------------------------


@pytest.mark.slow
async def test_grpcurl_list_health_and_calls(outpost_process):
    op = outpost_process('c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"\n')
    op.start()
    await op.wait_serving()
    addr = op.address

    listed = await asyncio.to_thread(grpcurl, "-plaintext", addr, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "jupyterhub.outpost.v1.OutpostService" in services
    assert "grpc.health.v1.Health" in services

    described = await asyncio.to_thread(
        grpcurl, "-plaintext", addr, "describe", "jupyterhub.outpost.v1.OutpostService"
    )
    assert "rpc Events" in described.stdout and "stream .jupyterhub.outpost.v1.EventsResponse" in described.stdout

    health = await asyncio.to_thread(grpcurl, "-plaintext", addr, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"

    missing = await asyncio.to_thread(
        grpcurl, "-plaintext", "-d", '{"server_name": "ghost"}', addr,
        "jupyterhub.outpost.v1.OutpostService/Poll",
    )
    assert missing.returncode != 0 and "NotFound" in missing.stderr and "ghost" in missing.stderr

    start = await asyncio.to_thread(
        grpcurl,
        "-plaintext",
        "-d",
        json.dumps({"server_name": "alice", "start_id": "s1", "user": {"name": "alice"}, "wait_until_ready": True}),
        addr,
        "jupyterhub.outpost.v1.OutpostService/Start",
    )
    assert start.returncode == 0, start.stderr
    assert json.loads(start.stdout)["status"]["state"] == "SERVER_STATE_RUNNING"

    poll = await asyncio.to_thread(
        grpcurl, "-plaintext", "-d", '{"server_name": "alice"}', addr,
        "jupyterhub.outpost.v1.OutpostService/Poll",
    )
    assert poll.returncode == 0, poll.stderr
    status = json.loads(poll.stdout)["status"]
    assert status["state"] == "SERVER_STATE_RUNNING" and status["address"]["port"] == 12345
