"""What the hub holds open to each Outpost: made on first use, shared, closed together.

For one :class:`~outpost_client.outposts.OutpostConfig`, :class:`OutpostResources` holds
the Outpost's :class:`~outpost_client.client.OutpostClient` (one gRPC channel), the
:class:`~outpost_client.batch.BatchPoller` that coalesces polls into BatchPoll calls on
that client, and the :class:`~outpost_client.tunnel.Tunnel` to its notebooks. Every
spawner of the hub whose Outpost has an equal config gets the same ones from
:data:`REGISTRY`, the hub process's registry: the config (a frozen dataclass) is the key.

A tunnel is the one thing two different configs may share: it comes from
:meth:`Tunnel.for_target <outpost_client.tunnel.Tunnel.for_target>`, so one SSH server,
user and set of reverse forwards is one SSH connection, whichever Outposts use it.

JupyterHub calls nothing on shutdown, so the hub never closes these;
:meth:`Registry.close` and :meth:`Registry.close_all` are for tests and a reconciler.
A spawner that uses an Outpost after its resources were closed gets new ones.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .batch import BatchPoller
from .client import OutpostClient
from .outposts import OutpostConfig

if TYPE_CHECKING:
    from .tunnel import Tunnel

log = logging.getLogger("outpost.registry")


class OutpostResources:
    """One Outpost's client, poller and tunnel, each made on first use."""

    def __init__(self, config: OutpostConfig):
        self.config = config
        self._client: OutpostClient | None = None
        self._poller: BatchPoller | None = None
        self._tunnel: Tunnel | None = None

    def client(self, timeout: float) -> OutpostClient:
        """The Outpost's client. ``timeout`` (the deadline of each call, in seconds) is the
        first caller's: every spawner of a hub has the same."""
        if self._client is None:
            c = self.config
            self._client = OutpostClient(c.address, tls=c.tls, token=c.token, timeout=timeout)
        return self._client

    def poller(self, timeout: float, window: float) -> BatchPoller:
        """The poller on :meth:`client`; ``window`` is the first caller's, as ``timeout``."""
        if self._poller is None:
            self._poller = BatchPoller(self.client(timeout), window)
        return self._poller

    def tunnel(self, hub_api_url: str) -> Tunnel | None:
        """The tunnel to the Outpost's notebooks; None without ``ssh_host`` (no tunnel).

        ``hub_api_url`` is where a reverse forward (``hub_api_forward``) leads. A tunnel
        closed meanwhile is replaced by a new one.
        """
        if not self.config.ssh_host:
            return None
        from .tunnel import Tunnel  # asyncssh only for hubs that tunnel

        self._tunnel = Tunnel.for_target(self.config.ssh_target(hub_api_url))
        return self._tunnel

    async def close(self, *, keep_tunnel: bool = False) -> None:
        """Close the tunnel (its forwards and SSH connection; not if ``keep_tunnel``), the
        poller (polls still waiting for their window get Unavailable) and the channel."""
        tunnel, self._tunnel = self._tunnel, None
        poller, self._poller = self._poller, None
        client, self._client = self._client, None
        if tunnel is not None and not keep_tunnel:
            await tunnel.close()
        if poller is not None:
            poller.close()
        if client is not None:
            await client.close()


class Registry:
    """The OutpostResources of every Outpost in use, by config."""

    def __init__(self) -> None:
        self._resources: dict[OutpostConfig, OutpostResources] = {}

    def get(self, config: OutpostConfig) -> OutpostResources:
        """The resources for config (equal configs: the same ones)."""
        resources = self._resources.get(config)
        if resources is None:
            resources = self._resources[config] = OutpostResources(config)
        return resources

    def __contains__(self, config: object) -> bool:
        return config in self._resources

    def __len__(self) -> int:
        return len(self._resources)

    async def close(self, config: OutpostConfig) -> None:
        """Close one Outpost's resources and forget them. A tunnel another config still
        uses (the same SSH target) stays open."""
        resources = self._resources.pop(config, None)
        if resources is not None:
            shared = resources._tunnel is not None and any(
                other._tunnel is resources._tunnel for other in self._resources.values()
            )
            await resources.close(keep_tunnel=shared)

    async def close_all(self) -> None:
        """Close every Outpost's resources and forget them all; a failure to close one is
        logged, and the others are closed still (e.g. as a test's teardown)."""
        resources, self._resources = list(self._resources.values()), {}
        for r in resources:
            try:
                await r.close()
            except Exception:
                log.exception("closing the connections to the Outpost at %s failed", r.config.address)


# the hub process's: every OutpostSpawner uses it
REGISTRY = Registry()
