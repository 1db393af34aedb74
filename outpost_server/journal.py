"""Writing what changed of a record: the database first, then what callers see.

Nothing a caller can see (an event, a state) runs ahead of the database: a client told
"ready" can rely on a restarted Outpost knowing it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from outpost_client.errors import Unavailable

from .records import Record
from .store import Store

log = logging.getLogger("outpost.manager")


class Journal:
    """Writes records' column values and events to the store, and emits events."""

    def __init__(self, store: Store):
        self.store = store
        #: set by the manager's shutdown: a write that keeps failing then gives up
        self.closing = False

    async def write(self, rec: Record, *, events: list[dict] | None = None, **values: Any) -> None:
        """Write column values and events of rec in one transaction (Unavailable if the
        database does not answer)."""
        ops = []
        if values:
            ops.append(self.store.op_update_server(rec.hub, rec.name, **values))
        if events:
            ops.append(self.store.op_add_events(rec.hub, rec.name, events))
        if ops:
            await self.store.write(*ops)

    async def write_retrying(self, rec: Record, **kwargs: Any) -> None:
        """write(), retried with back-off until the database answers (or shutdown)."""
        delay = 0.1
        while True:
            try:
                await self.write(rec, **kwargs)
                return
            except Unavailable:
                if self.closing:
                    raise
                log.warning("Retrying the write for %s/%s in %.1fs", rec.hub, rec.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def emit(
        self,
        rec: Record,
        data: dict[str, Any],
        *,
        durable: bool,
        apply: Callable[[], None] | None = None,
        **values: Any,
    ) -> None:
        """Persist one event (and column values), then make it visible and wake waiters.

        ``apply`` changes the in-memory record after the write. With ``durable`` the write
        is retried until the database answers (a terminal event must not be lost);
        otherwise an event the database refused is still shown live.
        """
        async with rec.lock:
            data.setdefault("time", time.time())
            sequence = rec.events.next_sequence()
            row = {"sequence": sequence, "start_id": rec.start_id, "data": data}
            if durable:
                await self.write_retrying(rec, events=[row], **values)
            else:
                try:
                    await self.write(rec, events=[row], **values)
                except Unavailable:
                    log.warning("Event %d of %s/%s is not persisted", sequence, rec.hub, rec.name)
            if apply is not None:
                apply()
            rec.events.append(sequence, data)
            rec.changed()
