"""READY only once the notebook answers at the site (``c.Outpost.readiness_check``).

After the Spawner's start() returned an address, JupyterHub checks the notebook over
HTTP with a jittered exponential back-off (``Spawner.http_timeout``; its
``wait_for_http_server``): through an Outpost that check goes through the SSH tunnel,
and each miss costs the user the back-off's growing wait. The Outpost is at the site:
it checks the same thing right where the notebook runs, often and cheaply, and sends
READY only once the notebook answers, so the hub's first check succeeds.

What counts as answering is what JupyterHub counts: any HTTP response below 500 (even a
404) to a GET of ``<JUPYTERHUB_SERVICE_PREFIX>api`` (the notebook server's version,
without login). Connection refused or reset, a timeout and a 5xx mean "not yet". With
internal_ssl the check speaks TLS with the notebook's own certificate files; it does not
verify the notebook's certificate (it sends no credentials and reads nothing but the
status). The notebook asks for a client certificate of the hub's CAs, which the
Outpost does not have: its refusal (an alert, or with TLS 1.3 a disconnect after the
completed handshake, before any response) counts as answering: it listens and speaks TLS. No request carries a credential; the body is never read.

The check is bounded (``readiness_timeout``): a notebook that never answers gets READY
after the bound with a WARNING in the log (the hub's own check then decides, as without
the check), so a site where the Outpost cannot reach its notebooks is slowed, not broken
(switch the check off there). A notebook whose Spawner's poll() reports it exited fails
the start at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp

log = logging.getLogger("outpost.manager")

#: the first pause between two checks, and its growth factor (up to max_interval)
FIRST_INTERVAL = 0.05
GROWTH = 1.5
#: seconds one check may take (a notebook that accepts but never answers)
ATTEMPT_TIMEOUT = 2.0
#: seconds between two polls of the Spawner while the notebook does not answer
POLL_EVERY = 2.0


class NotebookExited(Exception):
    """The notebook exited before it answered; the message is for the user."""


def check_url(scheme: str, host: str, port: int, prefix: str) -> str:
    """The URL the check GETs: the notebook's api under its prefix (the hub's
    JUPYTERHUB_SERVICE_PREFIX, quoted: a hub chooses it, the site the address)."""
    prefix = prefix if prefix.startswith("/") else "/" + prefix
    if not prefix.endswith("/"):
        prefix += "/"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{quote(prefix, safe='/-._~@+')}api"


def ssl_context(cert_paths: dict | None) -> ssl.SSLContext:
    """The check's TLS context: the notebook's own key and certificate as client
    certificate (a notebook with internal_ssl asks for one), no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert_paths and cert_paths.get("certfile") and cert_paths.get("keyfile"):
        try:
            context.load_cert_chain(cert_paths["certfile"], cert_paths["keyfile"])
        except (OSError, ssl.SSLError) as e:
            log.warning("Readiness check without a client certificate: %s", e)
    return context


#: the last reason a check said "not yet" (for the WARNING after the bound)
last_miss: dict[str, str] = {}


async def answers(session: aiohttp.ClientSession, url: str, context: ssl.SSLContext | None) -> bool:
    """One check: whether the notebook at url answers now."""
    tls = {"ssl": context} if context is not None else {}
    try:
        async with session.get(url, allow_redirects=False, **tls) as r:
            if r.status >= 500:
                last_miss[url] = f"HTTP {r.status}"
            return r.status < 500
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        last_miss[url] = f"{type(e).__name__}: {e}"
        # with TLS: a refusal of our certificate means it listens and speaks TLS, so it
        # is up. With TLS 1.3 the refusal comes after the handshake completed, and
        # reaches us as a plain disconnect before any response (a connection refused
        # is another error: ClientConnectorError)
        return context is not None and (isinstance(e, aiohttp.ServerDisconnectedError) or _tls_refusal(e))
    return False


def _tls_refusal(error: BaseException | None) -> bool:
    """Whether error is (or was caused by) a TLS error from the peer."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (ssl.SSLError, aiohttp.ClientSSLError)):
            return True
        error = getattr(error, "os_error", None) or error.__cause__ or error.__context__
        seen += 1
    return False


async def wait_until_answers(
    url: str,
    *,
    timeout: float,
    max_interval: float,
    context: ssl.SSLContext | None = None,
    exited: Callable[[], Awaitable[int | None]] | None = None,
) -> float | None:
    """Check url until the notebook answers: the seconds it took, or None if it did not
    answer within timeout. NotebookExited when ``exited()`` (the Spawner's poll) returns
    an exit status meanwhile."""
    started = time.monotonic()
    deadline = started + timeout
    interval = FIRST_INTERVAL
    next_poll = started + POLL_EVERY
    attempt = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=attempt, trust_env=False) as session:
        while True:
            if await answers(session, url, context):
                return time.monotonic() - started
            now = time.monotonic()
            if exited is not None and now >= next_poll:
                status = await exited()
                if status is not None:
                    raise NotebookExited(
                        f"The server exited (status {status}) before it answered at the site."
                    )
                next_poll = time.monotonic() + POLL_EVERY
                now = time.monotonic()
            if now >= deadline:
                return None
            await asyncio.sleep(min(interval, deadline - now))
            interval = min(interval * GROWTH, max_interval)
