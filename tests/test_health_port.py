"""The plaintext health-only port (c.Outpost.health_port): what Kubernetes' native gRPC
probes and a container's health check reach when the main port is mTLS. It answers the
health service and nothing else, and turns NOT_SERVING on shutdown."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from outpost_client.v1 import outpost_pb2, outpost_pb2_grpc

from .test_tls import tls_traits

pytestmark = pytest.mark.rpc

SERVICE = "jupyterhub.outpost.v1.OutpostService"


async def check(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


async def test_health_port_answers_in_plaintext_while_the_main_port_is_mtls(start_outpost, pki):
    async with start_outpost(**tls_traits(pki, health_port=0)) as op:
        port = op.app.health_bound_port
        assert port and port != op.port
        assert await check(port) == health_pb2.HealthCheckResponse.SERVING
        assert await check(port, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        # the main port still wants a client certificate
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(op.port)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_serves_nothing_but_health(start_outpost, pki):
    async with start_outpost(**tls_traits(pki, health_port=0)) as op:
        port = op.app.health_bound_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await outpost_pb2_grpc.OutpostServiceStub(channel).ListServers(
                    outpost_pb2.ListServersRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                ):
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_is_off_by_default(start_outpost):
    async with start_outpost() as op:
        assert op.app.health_port is None
        assert op.app.health_server is None


async def test_health_port_turns_not_serving_then_closes_on_shutdown(start_outpost):
    async with start_outpost(health_port=0) as op:
        port = op.app.health_bound_port
        health = op.app.health
        assert await check(port) == health_pb2.HealthCheckResponse.SERVING
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await check(port) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(port)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
