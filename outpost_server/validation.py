"""Pure checks of request fields. Each raises InvalidArgument naming the field.

The allowed sets are part of the contract (see the proto's field comments and
docs/configuration.md); change them only together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from google.protobuf import struct_pb2

from outpost_client.errors import InvalidArgument

SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}")
START_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_USER_NAME = 255
MAX_GROUPS = 1000
MAX_ENV_KEY = 1024
MAX_BATCH = 10000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


def invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", metadata={"field": field})


def check_server_name(name: str, field: str = "server_name") -> str:
    if not name:
        raise invalid(field, "is required")
    if len(name) > 255:
        raise invalid(field, f"is {len(name)} characters long; at most 255 are allowed")
    if not SERVER_NAME_RE.fullmatch(name):
        raise invalid(
            field,
            f"{name[:64]!r} has characters outside the allowed set: ASCII letters, digits "
            "and '._@+-', starting with a letter or digit",
        )
    return name


def check_start_id(start_id: str, *, required: bool, field: str = "start_id") -> str:
    if not start_id:
        if required:
            raise invalid(
                field,
                "is required: choose a new id for every start (a UUID is a good choice), "
                "so that a retried Start attaches to the same start",
            )
        return start_id
    if not START_ID_RE.fullmatch(start_id):
        raise invalid(
            field,
            f"{start_id[:64]!r} must be 1 to 128 ASCII letters, digits or '._-'",
        )
    return start_id


def check_user_name(name: str, field: str = "user.name") -> str:
    if not name:
        raise invalid(field, "is required")
    if len(name) > MAX_USER_NAME:
        raise invalid(field, f"is longer than {MAX_USER_NAME} characters")
    if _CONTROL.search(name) or "/" in name:
        raise invalid(field, "must not contain control characters or '/'")
    return name


def check_groups(groups, field: str = "user.groups") -> list[str]:
    if len(groups) > MAX_GROUPS:
        raise invalid(field, f"has {len(groups)} entries; at most {MAX_GROUPS} are allowed")
    for index, group in enumerate(groups):
        if not group or len(group) > 255 or _CONTROL.search(group):
            raise invalid(
                f"{field}[{index}]",
                "must be 1 to 255 characters without control characters",
            )
    return list(groups)


def check_env(env: Mapping[str, str], field: str = "env") -> dict[str, str]:
    for key, value in env.items():
        if not key:
            raise invalid(field, "has an empty key")
        if len(key) > MAX_ENV_KEY:
            raise invalid(field, f"key {key[:32]!r}... is longer than {MAX_ENV_KEY} characters")
        if "=" in key or "\x00" in key:
            raise invalid(field, f"key {key[:64]!r} contains '=' or NUL, not allowed in an environment variable name")
        if "\x00" in value:
            raise invalid(f"{field}[{key[:64]}]", "value contains a NUL character")
    return dict(env)


def struct_depth(value: struct_pb2.Value | struct_pb2.Struct | struct_pb2.ListValue) -> int:
    """Nesting depth of a Struct/Value/ListValue (a flat Struct has depth 1)."""
    if isinstance(value, struct_pb2.Struct):
        return 1 + max((struct_depth(v) for v in value.fields.values()), default=0)
    if isinstance(value, struct_pb2.ListValue):
        return 1 + max((struct_depth(v) for v in value.values), default=0)
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_depth(value.struct_value)
    if kind == "list_value":
        return struct_depth(value.list_value)
    return 0


def has_non_finite(value) -> bool:
    """True if a Struct/Value/ListValue holds NaN or an infinity (JSON cannot store them)."""
    if isinstance(value, struct_pb2.Struct):
        return any(has_non_finite(v) for v in value.fields.values())
    if isinstance(value, struct_pb2.ListValue):
        return any(has_non_finite(v) for v in value.values)
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return not math.isfinite(value.number_value)
    if kind == "struct_value":
        return has_non_finite(value.struct_value)
    if kind == "list_value":
        return has_non_finite(value.list_value)
    return False


def check_struct(value: struct_pb2.Struct, field: str, max_depth: int):
    depth = struct_depth(value)
    if depth > max_depth:
        raise invalid(field, f"is nested {depth} levels deep; at most {max_depth} are allowed")
    if has_non_finite(value):
        raise invalid(field, "holds NaN or Infinity, which JSON (and so the Outpost's database) cannot store")
    return value


def check_auth_state(value: struct_pb2.Struct, max_depth: int, max_bytes: int, field: str = "auth_state"):
    """The user's auth_state: a Struct like user_options, and at most max_bytes serialized
    (the message never echoes its content: it holds the user's secrets)."""
    size = value.ByteSize()
    if size > max_bytes:
        raise invalid(
            field,
            f"is {size} bytes; this Outpost accepts at most {max_bytes} (c.Outpost.max_auth_state_bytes): "
            "send less of it (OutpostSpawner.auth_state_filter)",
        )
    return check_struct(value, field, max_depth)


def check_certificates(certs, field: str = "internal_ssl"):
    present = [bool(certs.key_pem), bool(certs.cert_pem), bool(certs.ca_pem)]
    if any(present) and not all(present):
        raise invalid(field, "needs key_pem, cert_pem and ca_pem together")
    for name in ("key_pem", "cert_pem", "ca_pem"):
        text = getattr(certs, name)
        if text and "-----BEGIN" not in text:
            raise invalid(f"{field}.{name}", "is not PEM")
    return certs


def check_page_size(size: int, field: str = "page_size", maximum: int = 10000) -> int:
    if size > maximum:
        raise invalid(field, f"is {size}; at most {maximum} are allowed")
    return size or 1000


FLAVOR_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")  # as flavors.NAME_RE


def check_flavor_name(name: str, field: str = "flavor") -> str:
    if not FLAVOR_NAME_RE.fullmatch(name):
        raise invalid(
            field,
            f"{name[:64]!r} is not a flavor name: 1 to 64 ASCII letters, digits or '._@+-', "
            "starting with a letter or digit",
        )
    return name
