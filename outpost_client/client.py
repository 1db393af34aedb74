"""OutpostClient: a typed asyncio client for one Outpost.

One client (one gRPC channel) per Outpost address, shared by every spawner of a hub.
Every call has a deadline; failed calls raise typed :mod:`outpost_client.errors`
exceptions; read-only calls (Poll, ListServers, ListFlavors, Events resumption) and the
idempotent ones (Start with the same start_id, Stop) are safe to retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import from_rpc_error
from .v1 import outpost_pb2 as pb
from .v1 import outpost_pb2_grpc as pb_grpc

ServerStatus = pb.ServerStatus
ServerState = pb.ServerState
StopOutcome = pb.StopOutcome
Event = pb.EventsResponse


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the Outpost: ca (PEM file) to verify it; cert and key (PEM files) for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name_override: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


def is_local_address(address: str) -> bool:
    """Whether a gRPC target (host:port, or a bare host) is on this host: a loopback
    address, localhost, or a unix socket."""
    import ipaddress

    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OutpostClient:
    """An asyncio client of one Outpost.

    ``address`` is ``host:port``. Without ``tls`` the channel is plaintext (only for an
    Outpost on loopback or behind a trusted network).

    ``token``: this hub's bearer token for an Outpost with ``hub_tokens``; every call
    carries ``authorization: Bearer <token>`` metadata. Plain per-call metadata rather than
    ``grpc.access_token_call_credentials``: call credentials are refused on an insecure
    channel, and tokens must also work on a plaintext loopback Outpost. The token is kept
    out of ``repr`` and logs.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TLSConfig | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.address = address
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] | None = None
        if token is not None:
            if not token or not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
                # never show the token itself
                raise ValueError("token: must be non-empty printable ASCII without spaces")
            if tls is None and not is_local_address(address):
                raise ValueError(
                    f"token: a bearer token would travel in clear to {address}; use TLS to the "
                    "Outpost (outpost_ca), or an Outpost on this host's loopback"
                )
            self._metadata = (("authorization", f"Bearer {token}"),)
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            *options,
        ]
        if tls is not None:
            if tls.server_name_override:
                opts.append(("grpc.ssl_target_name_override", tls.server_name_override))
            self.channel = grpc.aio.secure_channel(address, tls.credentials(), options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=opts)
        self.stub = pb_grpc.OutpostServiceStub(self.channel)

    async def __aenter__(self) -> OutpostClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def start(
        self,
        server_name: str,
        start_id: str,
        *,
        user_name: str,
        user_id: int = 0,
        admin: bool = False,
        groups: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        user_options: Mapping[str, Any] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        spawner_name: str = "",
        internal_ssl: Mapping[str, str] | None = None,
        wait_until_ready: bool = False,
        flavor: str = "",
        auth_state: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> pb.StartResponse:
        """Start a server (idempotent per (server_name, start_id)); flavor "": the
        Outpost's default for this hub and user, if it has flavors. ``auth_state`` (None:
        none) is the user's, sent as it is: the caller decides whether it may travel
        (OutpostSpawner sends it only over TLS)."""
        request = pb.StartRequest(
            server_name=server_name,
            start_id=start_id,
            user=pb.User(name=user_name, id=user_id, admin=admin, groups=list(groups)),
            env=dict(env or {}),
            spawner_name=spawner_name,
            wait_until_ready=wait_until_ready,
            flavor=flavor,
        )
        if user_options:
            request.user_options.update(dict(user_options))
        if config_overrides:
            request.config_overrides.update(dict(config_overrides))
        if internal_ssl:
            request.internal_ssl.CopyFrom(pb.InternalSslCertificates(**internal_ssl))
        if auth_state is not None:
            request.auth_state.SetInParent()  # present even when empty
            request.auth_state.update(dict(auth_state))
        return await self._call(self.stub.Start, request, timeout)

    async def poll(self, server_name: str, *, timeout: float | None = None) -> pb.ServerStatus:
        response = await self._call(self.stub.Poll, pb.PollRequest(server_name=server_name), timeout)
        return response.status

    async def batch_poll(
        self, server_names, *, timeout: float | None = None
    ) -> tuple[list[pb.ServerStatus], list[str]]:
        """Statuses of many servers in one call, and the names this hub has no server for."""
        response = await self._call(
            self.stub.BatchPoll, pb.BatchPollRequest(server_names=list(server_names)), timeout
        )
        return list(response.statuses), list(response.not_found)

    async def stop(
        self, server_name: str, start_id: str = "", *, timeout: float | None = None
    ) -> pb.StopResponse:
        """Stop a server (idempotent; a stale start_id stops nothing)."""
        request = pb.StopRequest(server_name=server_name, start_id=start_id)
        return await self._call(self.stub.Stop, request, timeout)

    async def list_flavors(
        self,
        user_name: str,
        groups: Sequence[str] = (),
        admin: bool = False,
        *,
        user_id: int = 0,
        timeout: float | None = None,
    ) -> pb.ListFlavorsResponse:
        """The flavors this hub may offer one user: limits, usage, whether the user may
        start one now (a snapshot), the default flavor and the user's cap across flavors."""
        request = pb.ListFlavorsRequest(user=pb.User(name=user_name, id=user_id, admin=admin, groups=list(groups)))
        return await self._call(self.stub.ListFlavors, request, timeout)

    async def list_servers(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> list[pb.ServerStatus]:
        """Every server of this hub (follows the pages)."""
        servers: list[pb.ServerStatus] = []
        token = ""
        while True:
            request = pb.ListServersRequest(page_size=page_size, page_token=token)
            response = await self._call(self.stub.ListServers, request, timeout)
            servers.extend(response.servers)
            token = response.next_page_token
            if not token:
                return servers

    async def list_server_pages(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[list[pb.ServerStatus]]:
        """Every server of this hub, one page (one ListServers call) at a time."""
        token = ""
        while True:
            request = pb.ListServersRequest(page_size=page_size, page_token=token)
            response = await self._call(self.stub.ListServers, request, timeout)
            yield list(response.servers)
            token = response.next_page_token
            if not token:
                return

    async def events(
        self,
        server_name: str,
        *,
        start_id: str = "",
        after_sequence: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.EventsResponse]:
        """Follow a start's events until its terminal event.

        ``timeout`` bounds the whole stream (default: none, the stream ends by itself).
        """
        request = pb.EventsRequest(
            server_name=server_name, start_id=start_id, after_sequence=after_sequence
        )
        call = self.stub.Events(request, timeout=timeout, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()
