"""Pure builders between protos and Python values (tested without sockets)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from outpost_client.errors import InvalidArgument
from outpost_client.v1 import outpost_pb2 as pb

from . import validation as v

STATE_NAMES = {
    pb.SERVER_STATE_STARTING: "starting",
    pb.SERVER_STATE_RUNNING: "running",
    pb.SERVER_STATE_STOPPING: "stopping",
    pb.SERVER_STATE_STOPPED: "stopped",
    pb.SERVER_STATE_UNKNOWN: "unknown",
}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


@dataclass
class StartSpec:
    """A validated StartRequest, in Python values."""

    server_name: str
    start_id: str
    user: dict[str, Any]
    env: dict[str, str]
    user_options: dict[str, Any]
    config_overrides: dict[str, Any]
    spawner_name: str = ""
    certificates: dict[str, str] = field(default_factory=dict)
    wait_until_ready: bool = False
    #: the flavor asked for ("": the default), then the one admitted (flavors.py); stored
    flavor: str = ""
    #: what the server keeps of its flavor (Flavor.record(): config, max_runtime), so
    #: that a reload of the flavors never changes it; stored
    flavor_spec: dict[str, Any] = field(default_factory=dict)
    #: the user's auth_state the hub sent (None: none); secret: stored encrypted, never
    #: logged, dropped when the server stops
    auth_state: dict[str, Any] | None = None

    @property
    def flavor_config(self) -> dict[str, Any]:
        """The Spawner options the site sets for this start's flavor."""
        return self.flavor_spec.get("config") or {}

    @property
    def max_runtime(self) -> float:
        """Seconds this start's flavor lets it run (0: no limit)."""
        return self.flavor_spec.get("max_runtime") or 0


def value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [value_to_python(x) for x in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # Struct has only doubles; 8888.0 is meant as 8888 (ports, limits, counts)
        if number.is_integer() and abs(number) < 2**53:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_python(val) for key, val in struct.fields.items()}


def python_to_struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if data:
        struct.update(data)
    return struct


#: the default of c.Outpost.max_auth_state_bytes
MAX_AUTH_STATE_BYTES = 64 * 1024


def start_spec_from_request(
    request: pb.StartRequest, *, max_depth: int, max_auth_state_bytes: int = MAX_AUTH_STATE_BYTES
) -> StartSpec:
    """Validate a StartRequest and turn it into a StartSpec (raises InvalidArgument)."""
    v.check_server_name(request.server_name)
    v.check_start_id(request.start_id, required=True)
    if not request.HasField("user"):
        raise v.invalid("user", "is required (at least user.name)")
    v.check_user_name(request.user.name)
    groups = v.check_groups(request.user.groups)
    if request.spawner_name:
        v.check_server_name(request.spawner_name, field="spawner_name")
    env = v.check_env(request.env)
    v.check_struct(request.user_options, "user_options", max_depth)
    v.check_struct(request.config_overrides, "config_overrides", max_depth)
    v.check_certificates(request.internal_ssl)
    auth_state = None
    if request.HasField("auth_state"):
        v.check_auth_state(request.auth_state, max_depth, max_auth_state_bytes)
        auth_state = struct_to_python(request.auth_state)
    if request.flavor:
        v.check_flavor_name(request.flavor)
    certs = {}
    if request.internal_ssl.key_pem:
        certs = {
            "key_pem": request.internal_ssl.key_pem,
            "cert_pem": request.internal_ssl.cert_pem,
            "ca_pem": request.internal_ssl.ca_pem,
        }
    return StartSpec(
        server_name=request.server_name,
        start_id=request.start_id,
        user={
            "name": request.user.name,
            "id": request.user.id,
            "admin": request.user.admin,
            "groups": groups,
        },
        env=env,
        user_options=struct_to_python(request.user_options),
        config_overrides=struct_to_python(request.config_overrides),
        spawner_name=request.spawner_name,
        certificates=certs,
        wait_until_ready=request.wait_until_ready,
        flavor=request.flavor,
        auth_state=auth_state,
    )


def user_from_request(user: pb.User) -> dict[str, Any]:
    """A request's User, checked (InvalidArgument naming the field), as a dict."""
    v.check_user_name(user.name)
    return {"name": user.name, "id": user.id, "admin": user.admin, "groups": v.check_groups(user.groups)}


def flavor_to_proto(flavor, usage, *, unavailable_reason: str = "") -> pb.Flavor:
    """One flavor (flavors.Flavor) as a hub's user sees it, with its usage (flavors.Usage)."""
    return pb.Flavor(
        name=flavor.name,
        display_name=flavor.display_name,
        description=flavor.description,
        max_total=flavor.max_total,
        max_per_hub=flavor.max_per_hub,
        max_per_user=flavor.max_per_user,
        in_use_total=usage.total,
        in_use_hub=usage.hub,
        in_use_user=usage.user,
        max_runtime_seconds=int(flavor.max_runtime),
        available=not unavailable_reason,
        unavailable_reason=unavailable_reason,
    )


def timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def event_from_spawner(item: Any) -> dict[str, Any]:
    """Normalise one item of Spawner.progress() into the stored event fields."""
    if not isinstance(item, dict):
        return {"kind": pb.EVENT_KIND_PROGRESS, "message": str(item)}
    data: dict[str, Any] = {"kind": pb.EVENT_KIND_PROGRESS}
    data["message"] = str(item.get("message", ""))
    if item.get("html_message"):
        data["html_message"] = str(item["html_message"])
    progress = item.get("progress")
    if progress is not None:
        try:
            data["progress"] = max(0, min(100, int(progress)))
        except (TypeError, ValueError):
            pass
    return data


def event_to_proto(data: dict[str, Any], *, sequence: int, start_id: str) -> pb.EventsResponse:
    msg = pb.EventsResponse(
        sequence=sequence,
        start_id=start_id,
        kind=data.get("kind", pb.EVENT_KIND_PROGRESS),
        message=data.get("message", ""),
        html_message=data.get("html_message", ""),
        error_class=data.get("error_class", ""),
        output_tail=data.get("output_tail", ""),
    )
    if "progress" in data:
        msg.progress = data["progress"]
    if "time" in data:
        msg.time.FromSeconds(0)
        msg.time.FromNanoseconds(int(data["time"] * 1e9))
    address = data.get("address")
    if address:
        msg.address.CopyFrom(pb.ServerAddress(**address))
    return msg


def encode_page_token(last_name: str) -> str:
    return base64.urlsafe_b64encode(b"v1:" + last_name.encode()).decode()


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except Exception:
        raw = b""
    if not raw.startswith(b"v1:"):
        raise InvalidArgument(
            "page_token: not a token from ListServers; pass next_page_token unchanged",
            metadata={"field": "page_token"},
        )
    return raw[3:].decode(errors="replace")
