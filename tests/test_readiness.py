"""c.Outpost.readiness_check: READY only once the notebook answers at the site (bounded,
switchable off). The real jupyterhub-singleuser behind a real hub: tests/test_e2e_hub.py
(harness.site.Site runs with the check on)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from outpost_client import pb
from outpost_server import readiness
from outpost_server.testing import LateListenSpawner

from .harness.util import sid, wait_for

pytestmark = pytest.mark.rpc

LATE = "outpost_server.testing.LateListenSpawner"
ENV = {"JUPYTERHUB_SERVICE_PREFIX": "/user/ann/"}


async def terminal_event(client, name: str, start_id: str) -> tuple[pb.EventsResponse, float]:
    """The terminal event of a start, and time.monotonic() when the client got it."""
    async for event in client.events(name, start_id=start_id):
        if event.kind in (pb.EVENT_KIND_READY, pb.EVENT_KIND_FAILED):
            return event, time.monotonic()
    raise AssertionError("no terminal event")


async def test_readiness_ready_only_after_the_notebook_listens(start_outpost):
    async with start_outpost(LATE, readiness_check=True, **{"LateListenSpawner.listen_delay": 1.0}) as op:
        start_id = sid()
        await op.client.start("ann", start_id, user_name="ann", env=ENV)
        event, got_it = await terminal_event(op.client, "ann", start_id)
        assert event.kind == pb.EVENT_KIND_READY, event
        assert LateListenSpawner.listening_at, "READY before the notebook listened"
        assert LateListenSpawner.listening_at[0] <= got_it
        # it asked the notebook's api under the hub's prefix, as the hub's check does
        assert LateListenSpawner.paths[0] == "/user/ann/api"


async def test_readiness_switched_off_is_ready_at_once(start_outpost):
    async with start_outpost(LATE, readiness_check=False, **{"LateListenSpawner.listen_delay": 30.0}) as op:
        start_id = sid()
        await op.client.start("ann", start_id, user_name="ann", env=ENV)
        event, _ = await terminal_event(op.client, "ann", start_id)
        assert event.kind == pb.EVENT_KIND_READY
        assert not LateListenSpawner.listening_at and not LateListenSpawner.paths


async def test_readiness_is_bounded_ready_after_the_bound_with_a_warning(start_outpost, caplog):
    """A notebook that never answers: READY after readiness_timeout, and a WARNING that
    says how to switch the check off."""
    traits = {"LateListenSpawner.listen_delay": -1.0, "readiness_timeout": 0.5}
    async with start_outpost(LATE, readiness_check=True, **traits) as op:
        start_id = sid()
        with caplog.at_level(logging.WARNING, logger="outpost.manager"):
            await op.client.start("ann", start_id, user_name="ann", env=ENV)
            event, _ = await terminal_event(op.client, "ann", start_id)
        assert event.kind == pb.EVENT_KIND_READY
        assert "did not answer at http://127.0.0.1:" in caplog.text
        assert "within 0.5s (c.Outpost.readiness_timeout)" in caplog.text
        assert "c.Outpost.readiness_check = False" in caplog.text


async def test_readiness_notebook_that_exited_fails_the_start(start_outpost):
    LateListenSpawner.exit_status = 3
    traits = {"LateListenSpawner.listen_delay": -1.0, "readiness_timeout": 60.0}
    async with start_outpost(LATE, readiness_check=True, **traits) as op:
        start_id = sid()
        await op.client.start("ann", start_id, user_name="ann", env=ENV)
        event, _ = await terminal_event(op.client, "ann", start_id)
        assert event.kind == pb.EVENT_KIND_FAILED
        assert event.message == "The server exited (status 3) before it answered at the site."


async def test_readiness_stop_during_the_check(start_outpost):
    traits = {"LateListenSpawner.listen_delay": -1.0, "readiness_timeout": 60.0}
    async with start_outpost(LATE, readiness_check=True, **traits) as op:
        start_id = sid()
        await op.client.start("ann", start_id, user_name="ann", env=ENV)
        assert (await op.client.poll("ann")).state == pb.SERVER_STATE_STARTING
        assert (await op.client.stop("ann", start_id)).outcome == pb.STOP_OUTCOME_STOPPED
        assert ("default", "ann") not in op.manager.records


def test_readiness_check_url_quotes_the_hubs_prefix():
    assert readiness.check_url("http", "10.0.0.5", 8888, "/user/ann/") == "http://10.0.0.5:8888/user/ann/api"
    assert readiness.check_url("https", "::1", 1, "user/a b") == "https://[::1]:1/user/a%20b/api"
    assert readiness.check_url("http", "h", 2, "/user/x?y#z/") == "http://h:2/user/x%3Fy%23z/api"


async def test_readiness_tls_notebook_that_refuses_our_certificate_answers(pki):
    """internal_ssl: the notebook asks for a client certificate of a CA the Outpost's is not
    signed by; its TLS refusal still says it is up (and nothing listening is not)."""
    import asyncio
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server.cert, pki.server.key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(pki.ca.cert)

    async def answer(reader, writer):
        try:
            await reader.read(100)
        except (ssl.SSLError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    url = readiness.check_url("https", "127.0.0.1", port, "/user/ann/")
    context = readiness.ssl_context(None)  # no client certificate at all
    async with server:
        took = await readiness.wait_until_answers(url, timeout=5, max_interval=0.1, context=context)
        assert took is not None
    server.close()
    await server.wait_closed()
    assert await readiness.wait_until_answers(url, timeout=0.3, max_interval=0.1, context=context) is None


async def test_readiness_wait_holds_no_start_slot_of_the_admission_queue(start_outpost):
    """max_concurrent_starts_per_hub = 1: a start whose Spawner's start() returned and that
    only waits for its notebook to answer frees its slot, so the next start of the hub
    runs its start() meanwhile instead of waiting in the queue."""
    traits = {"LateListenSpawner.listen_delay": -1.0, "readiness_timeout": 60.0}
    async with start_outpost(LATE, readiness_check=True, max_concurrent_starts_per_hub=1, **traits) as op:
        first, second = sid(), sid()
        await op.client.start("ann", first, user_name="ann", env=ENV)
        await op.client.start("bob", second, user_name="bob", env=ENV)
        records = op.manager.records

        def launched() -> set[str]:
            return {name for (_, name) in records if records[("default", name)].launched}

        # both notebooks launched; neither answers, so both still wait for their answer
        await wait_for(lambda: launched() == {"ann", "bob"}, timeout=10, message=str(launched()))
        assert not any(records[key].queued for key in records)
        assert (await op.client.poll("ann")).state == pb.SERVER_STATE_STARTING
        assert (await op.client.poll("bob")).state == pb.SERVER_STATE_STARTING


async def test_readiness_bound_is_the_spawners_http_timeout_by_default(start_outpost, caplog):
    """Without readiness_timeout the check waits as long as JupyterHub would give the
    started server to answer: the hosted Spawner's http_timeout (here 1 s, not 30)."""
    traits = {"LateListenSpawner.listen_delay": -1.0, "LateListenSpawner.http_timeout": 1}
    async with start_outpost(LATE, readiness_check=True, **traits) as op:
        start_id = sid()
        with caplog.at_level(logging.WARNING, logger="outpost.manager"):
            await op.client.start("ann", start_id, user_name="ann", env=ENV)
            event, _ = await asyncio.wait_for(terminal_event(op.client, "ann", start_id), 20)
        assert event.kind == pb.EVENT_KIND_READY
        assert "within 1s (the Spawner's http_timeout)" in caplog.text
