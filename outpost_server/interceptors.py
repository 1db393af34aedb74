"""Cross-cutting concerns of every Outpost RPC, in one grpc.aio interceptor.

- the calling hub's identity, resolved once per call from the connection by the
  resolver identity.py made for the configured auth mode, and kept in a context variable
  (:func:`current_hub`);
- errors: an :class:`OutpostError` raised anywhere below becomes its status with one
  ErrorInfo; any other exception becomes INTERNAL with its class name, and its traceback
  goes to the log only;
- an access log line per call (at DEBUG, with duration and status), and the call in
  ``outpost_rpc_duration_seconds`` when metrics are served (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

import grpc
from grpc_status import rpc_status

from google.protobuf.message import DecodeError

from outpost_client.errors import InvalidArgument, OutpostBug, OutpostError, Unauthenticated, to_status_proto

from . import metrics
from .identity import HubResolver

log = logging.getLogger("outpost.rpc")

SERVICE_PREFIX = "/jupyterhub.outpost.v1.OutpostService/"

_hub: contextvars.ContextVar[str] = contextvars.ContextVar("outpost_hub")


def current_hub() -> str:
    """The identity of the hub that made the current call."""
    return _hub.get()


def internal_error(error: BaseException) -> OutpostBug:
    return OutpostBug(
        f"Internal error in the Outpost ({type(error).__name__}); its log has the details.",
        metadata={"error_class": type(error).__name__},
    )


class Undecodable:
    """Stands in for a request protobuf could not parse (so we can answer INVALID_ARGUMENT)."""

    def __init__(self, error: Exception):
        self.error = error


def safe_deserializer(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as e:
            return Undecodable(e)

    return parse


def check_decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            "request: could not be decoded (malformed, or nested deeper than protobuf's "
            f"limit of 100 levels): {request.error}",
            metadata={"field": "request"},
        )


async def abort(context, error: OutpostError):
    status = rpc_status.to_status(to_status_proto(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def aborted_code(context) -> str:
    """The status a handler aborted its call with itself (UNKNOWN if not known)."""
    try:
        code = context.code()
    except Exception:
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def done(name: str, code: str, started: float) -> None:
    """One call ended: its access log line (DEBUG) and its metric (when served)."""
    if metrics.enabled:
        metrics.observe_rpc(name, code, time.perf_counter() - started)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s %.2fms", name, code, (time.perf_counter() - started) * 1e3)


class OutpostInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, resolve_hub: HubResolver):
        self.resolve_hub = resolve_hub

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler  # health, reflection: no hub identity needed
        name = method[len(SERVICE_PREFIX):]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary),
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream),
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _enter(self, context) -> None:
        # each RPC runs in its own task, so the variable needs no reset
        hub = self.resolve_hub(context)
        if not hub:
            raise Unauthenticated(
                "This connection does not identify a hub: use a client certificate "
                "signed by a CA the Outpost trusts."
            )
        _hub.set(hub)

    @staticmethod
    def _error(name: str, e: BaseException) -> OutpostError:
        if isinstance(e, OutpostError):
            return e
        log.error("%s failed", name, exc_info=e)
        return internal_error(e)

    def _wrap_unary(self, name, behavior):
        async def unary(request, context):
            started = time.perf_counter()
            code = "OK"
            try:
                self._enter(context)
                check_decoded(request)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away, or the server stops
                raise
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    code = aborted_code(context)
                    raise
                error = self._error(name, e)
                code = error.code.name
                await abort(context, error)
            finally:
                done(name, code, started)

        return unary

    def _wrap_stream(self, name, behavior):
        async def stream(request, context):
            started = time.perf_counter()
            code = "OK"
            try:
                self._enter(context)
                check_decoded(request)
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away, or the server stops
                raise
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    code = aborted_code(context)
                    raise
                error = self._error(name, e)
                code = error.code.name
                await abort(context, error)
            finally:
                done(name, code, started)

        return stream
