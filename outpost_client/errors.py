"""Typed errors of the Outpost contract, shared by the client and the server.

Every error the Outpost sends is a gRPC status with one ``google.rpc.ErrorInfo`` detail.
:func:`from_rpc_error` turns a failed call back into one of the exceptions below, so hub
code can ``except ServerNotFound`` instead of comparing status codes.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "outpost.jupyterhub.org"

# ErrorInfo reasons (documented in the proto's header comment).
INVALID_FIELD = "INVALID_FIELD"
SERVER_NOT_FOUND = "SERVER_NOT_FOUND"
START_NOT_FOUND = "START_NOT_FOUND"
SERVER_ALREADY_STARTED = "SERVER_ALREADY_STARTED"
OVERRIDE_NOT_ALLOWED = "OVERRIDE_NOT_ALLOWED"
SPAWNER_ERROR = "SPAWNER_ERROR"
PERSISTENCE_UNAVAILABLE = "PERSISTENCE_UNAVAILABLE"
SHUTTING_DOWN = "SHUTTING_DOWN"
UNAUTHENTICATED_HUB = "UNAUTHENTICATED_HUB"
TOO_MANY_STARTS = "TOO_MANY_STARTS"


class OutpostError(Exception):
    """An error of the Outpost contract: status code, message for a person, ErrorInfo.

    On the server, raising one of these (or a subclass) anywhere below the servicer is the
    one way to answer with a status other than OK; the message is shown to the caller as
    it is, so it must make sense to a person and never contain a traceback.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"


class InvalidArgument(OutpostError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = INVALID_FIELD

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class ServerNotFound(OutpostError):
    code = grpc.StatusCode.NOT_FOUND
    reason = SERVER_NOT_FOUND


class StartNotFound(OutpostError):
    code = grpc.StatusCode.NOT_FOUND
    reason = START_NOT_FOUND


class ServerAlreadyStarted(OutpostError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = SERVER_ALREADY_STARTED


class OverrideNotAllowed(OutpostError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = OVERRIDE_NOT_ALLOWED


class SpawnerError(OutpostError):
    code = grpc.StatusCode.INTERNAL
    reason = SPAWNER_ERROR

    @property
    def error_class(self) -> str:
        return self.metadata.get("error_class", "")


class Unavailable(OutpostError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = PERSISTENCE_UNAVAILABLE


class Unauthenticated(OutpostError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = UNAUTHENTICATED_HUB


class ResourceExhausted(OutpostError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(OutpostError):
    """The call's deadline passed (the Outpost may still finish what it was doing)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_REASON: dict[str, type[OutpostError]] = {
    cls.reason: cls
    for cls in (
        InvalidArgument,
        ServerNotFound,
        StartNotFound,
        ServerAlreadyStarted,
        OverrideNotAllowed,
        SpawnerError,
        Unauthenticated,
    )
}
_BY_REASON[PERSISTENCE_UNAVAILABLE] = Unavailable
_BY_REASON[SHUTTING_DOWN] = Unavailable

_BY_CODE: dict[grpc.StatusCode, type[OutpostError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ServerNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: ServerAlreadyStarted,
    grpc.StatusCode.PERMISSION_DENIED: OverrideNotAllowed,
    grpc.StatusCode.INTERNAL: SpawnerError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

_DETAILS_KEY = "grpc-status-details-bin"


def to_status_proto(error: OutpostError) -> status_pb2.Status:
    """The google.rpc.Status (with one ErrorInfo) that carries ``error`` over the wire."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason or error.code.name, domain=DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(info)
    return status


def from_rpc_error(err: grpc.RpcError) -> OutpostError:
    """Decode a failed call into a typed :class:`OutpostError`.

    The ErrorInfo reason picks the class; without one (errors made by gRPC itself, such as
    an unreachable Outpost or an oversized message) the status code does.
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = err.details() if callable(getattr(err, "details", None)) else str(err)
    reason = ""
    metadata: dict[str, str] = {}
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    metadata = dict(info.metadata)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, OutpostError)
    error = cls(message or code.name, code=code, reason=reason or None, metadata=metadata)
    error.__cause__ = err
    return error
