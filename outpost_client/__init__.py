"""What a JupyterHub installs to use Outposts: the stubs, OutpostClient and its errors."""

from .client import Event, OutpostClient, ServerState, ServerStatus, StopOutcome, TLSConfig
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    OutpostError,
    OverrideNotAllowed,
    ResourceExhausted,
    ServerAlreadyStarted,
    ServerNotFound,
    SpawnerError,
    StartNotFound,
    Unauthenticated,
    Unavailable,
)
from .v1 import outpost_pb2 as pb

__all__ = [
    "DeadlineExceeded",
    "Event",
    "InvalidArgument",
    "OutpostClient",
    "OutpostError",
    "OverrideNotAllowed",
    "ResourceExhausted",
    "ServerAlreadyStarted",
    "ServerNotFound",
    "ServerState",
    "ServerStatus",
    "SpawnerError",
    "StartNotFound",
    "StopOutcome",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
    "pb",
]
