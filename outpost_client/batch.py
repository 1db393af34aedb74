"""BatchPoller: the polls of every spawner that uses one Outpost, as BatchPoll calls.

JupyterHub polls each server on its own timer; a poll waits at most ``window`` seconds
for others to join it, then one BatchPoll answers them all (and at hub start-up, when
every server is polled at once, one call answers hundreds). The hub keeps one poller per
Outpost (:mod:`outpost_client.registry`).
"""

from __future__ import annotations

import asyncio

from .client import OutpostClient
from .errors import ServerNotFound, Unavailable
from .v1 import outpost_pb2 as pb


class BatchPoller:
    """Coalesces the polls of every spawner using one Outpost into BatchPoll calls."""

    def __init__(self, client: OutpostClient, window: float):
        self.client = client
        self.window = window
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._flush: asyncio.TimerHandle | None = None
        self.calls = 0  # BatchPoll calls made (for tests and logs)

    async def status(self, name: str) -> pb.ServerStatus:
        """The server's status, or ServerNotFound / the call's error."""
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(name, []).append(future)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.window, self._start_flush)
        return await future

    def close(self) -> None:
        """Answer the polls still waiting for their window with Unavailable (the hub is
        closing its client to this Outpost); a BatchPoll already sent ends with the client."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending, self._pending = self._pending, {}
        for futures in pending.values():
            for f in futures:
                if not f.done():
                    f.set_exception(Unavailable("The hub closed its connection to this Outpost."))

    def _start_flush(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, {}
        asyncio.ensure_future(self._send(pending))

    async def _send(self, pending: dict[str, list[asyncio.Future]]) -> None:
        self.calls += 1
        try:
            statuses, _ = await self.client.batch_poll(list(pending))
        except Exception as e:
            for futures in pending.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(e)
            return
        found = {st.server_name: st for st in statuses}
        for name, futures in pending.items():
            for f in futures:
                if f.done():
                    continue
                if name in found:
                    f.set_result(found[name])
                else:
                    f.set_exception(ServerNotFound(f"No server {name!r} at this Outpost."))
