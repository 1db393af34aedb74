"""One error catalogue: the proto's list of reasons, the constants and classes of
outpost_client/errors.py, and what the client decodes, agree; the Outpost raises only
catalogued errors."""

from __future__ import annotations

import ast
import re

import grpc
import pytest

from outpost_client import errors
from outpost_client.errors import (
    BY_REASON,
    OutpostBug,
    OutpostError,
    Unavailable,
    from_rpc_error,
    to_status_proto,
)

from .harness.outpost import ROOT

pytestmark = pytest.mark.rpc

PROTO = ROOT / "protos" / "jupyterhub" / "outpost" / "v1" / "outpost.proto"


def proto_reasons() -> set[str]:
    header = PROTO.read_text().split("syntax =", 1)[0]
    listed = header.split("Reasons in this version:", 1)[1]
    return set(re.findall(r"^//   ([A-Z][A-Z_]+)\s", listed, flags=re.M))


def constant_reasons() -> set[str]:
    return {
        name
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and value == name
    }


def test_proto_constants_and_decoder_list_the_same_reasons():
    listed, constants, decoded = proto_reasons(), constant_reasons(), set(BY_REASON)
    assert len(listed) >= 11, listed  # the parser found the list
    assert listed == constants, f"proto only: {listed - constants}; errors.py only: {constants - listed}"
    assert decoded == constants, f"not decoded: {constants - decoded}; decoded only: {decoded - constants}"


class FailedCall(grpc.RpcError):
    """A failed call as grpc.aio raises it: code, details and trailing metadata."""

    def __init__(self, code, details, trailers=()):
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def on_the_wire(error: OutpostError) -> FailedCall:
    status = to_status_proto(error)
    return FailedCall(error.code, error.message, [("grpc-status-details-bin", status.SerializeToString())])


@pytest.mark.parametrize("reason", sorted(BY_REASON))
def test_every_reason_decodes_back_to_its_class(reason):
    cls = BY_REASON[reason]
    sent = cls("something a person can act on", metadata={"k": "v"})
    assert sent.reason == reason and sent.code != grpc.StatusCode.UNKNOWN
    got = from_rpc_error(on_the_wire(sent))
    assert type(got) is cls
    assert (got.code, got.reason, got.message, got.metadata) == (sent.code, reason, sent.message, {"k": "v"})


@pytest.mark.parametrize(
    "code, expected",
    [
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    ],
)
def test_a_status_without_error_info_has_an_empty_reason(code, expected):
    got = from_rpc_error(FailedCall(code, "made by gRPC"))
    assert type(got) is expected and got.reason == "" and got.code == code


def test_a_reason_with_the_wrong_code_decodes_by_its_code():
    """A reason this client knows but with another status code (a newer Outpost, or a
    proxy in between) must not make, say, an UNAVAILABLE look like a NOT_FOUND."""
    sent = errors.ServerNotFound("gone")
    call = on_the_wire(sent)
    call._code = grpc.StatusCode.UNAVAILABLE
    got = from_rpc_error(call)
    assert type(got) is errors.Unavailable and got.reason == errors.SERVER_NOT_FOUND


def server_sources():
    for path in sorted((ROOT / "outpost_server").rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_every_reason_in_the_outpost_is_a_catalogued_constant():
    found = 0
    for path, tree in server_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "reason":
                found += 1
                value = node.value
                name = value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", None)
                assert name in BY_REASON, f"{path.name}:{node.value.lineno}: reason= {ast.unparse(value)}"


def test_the_outpost_raises_only_errors_with_a_reason():
    """Every contract error the Outpost raises has a catalogued reason (a class without
    one would travel with its status code's name as the reason)."""
    raised = set()
    for path, tree in server_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                cls = getattr(errors, name or "", None)
                if isinstance(cls, type) and issubclass(cls, OutpostError):
                    raised.add(name)
                    assert cls.reason in BY_REASON, f"{path.name}:{node.lineno} raises {name} without a reason"
    assert {"ServerNotFound", "TooManyStarts", "PersistenceUnavailable", "ShuttingDown"} <= raised, raised


async def test_an_outpost_bug_is_internal_error_not_a_spawner_error(outpost, monkeypatch):
    def broken(hub, server_name):
        raise KeyError("a bug")

    monkeypatch.setattr(outpost.manager, "poll", broken)
    with pytest.raises(OutpostBug) as err:
        await outpost.client.poll("anyone")
    assert err.value.reason == errors.INTERNAL_ERROR and err.value.code == grpc.StatusCode.INTERNAL
    assert err.value.error_class == "KeyError" and "a bug" not in err.value.message
    assert (await outpost.client.list_servers()) is not None  # and it keeps serving


async def test_an_unreachable_outpost_is_unavailable_without_a_reason():
    from outpost_client import OutpostClient

    from .harness.util import free_port

    client = OutpostClient(f"127.0.0.1:{free_port()}", timeout=2)
    try:
        with pytest.raises(Unavailable) as err:
            await client.poll("anyone")
    finally:
        await client.close()
    assert err.value.reason == "" and type(err.value) is Unavailable
