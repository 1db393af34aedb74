"""Hostile input (issue 4, item 8): property-based StartRequests against a running Outpost.

Hypothesis draws StartRequests with hostile values in every field (server names with path
tricks, unicode and control characters; bad start_ids; missing or odd users; env maps with
NUL, "=", huge values and thousands of keys; user_options and config_overrides nested up
to 120 levels; huge strings) and sends them to one real in-process Outpost (InstantSpawner,
small message limit). An oracle written from the proto's field comments (not from
validation.py) says what each answer must be:

- RESOURCE_EXHAUSTED when the request is larger than the configured limit;
- INVALID_ARGUMENT naming one of the malformed fields when the spec calls a field
  malformed (and only then, or for a field whose limits the spec leaves to the Outpost);
- otherwise the lifecycle answer of a model of the server's state: OK (created, or
  attached to the same start), FAILED_PRECONDITION (same name, other start_id) or
  PERMISSION_DENIED (config_overrides are denied by default).

Never UNKNOWN or INTERNAL; a second client polling a known-good server is served
throughout; refused requests leave nothing behind; afterwards the database matches the
manager's memory and restores into an equal set of servers.

Also: the message size limit exactly at its boundary, the nesting limit below and beyond
protobuf's own, undecodable bytes (invalid UTF-8, truncation, garbage) on every RPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import time
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outpost_client import OutpostClient, OutpostError, pb
from outpost_client.errors import TOO_MANY_STARTS, from_rpc_error
from outpost_server import validation
from outpost_server.app import Outpost
from outpost_server.convert import STATE_NAMES

from .harness.outpost import outpost_config, running_outpost
from .harness.util import sid, wait_for

pytestmark = pytest.mark.rpc

INSTANT = "outpost_server.testing.InstantSpawner"
HUB = "default"  # plaintext on loopback: every connection is the default hub
LIMIT = 256 * 1024  # max_message_bytes of the Outpost under attack
DEPTH = 16  # its max_struct_depth (the default)
SERVICE = "/jupyterhub.outpost.v1.OutpostService/"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
ACTIVE = {pb.SERVER_STATE_STARTING, pb.SERVER_STATE_RUNNING}
PEM = "-----BEGIN {0}-----\nTUlJQkl6Q0NBVEtnQXdJQkFnSVVm\n-----END {0}-----\n"

HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written into the tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)


# --- the spec, as the oracle reads it (outpost.proto's field comments) --------------------

SPEC_SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
SPEC_START_ID = re.compile(r"[A-Za-z0-9._-]+")


def spec_server_name_ok(name: str) -> bool:
    """1 to 255 characters, ASCII letters, digits and "._@+-", starting with a letter or digit."""
    return 1 <= len(name) <= 255 and SPEC_SERVER_NAME.fullmatch(name) is not None


def spec_start_id_ok(start_id: str) -> bool:
    """1 to 128 characters, ASCII letters, digits and "._-"."""
    return 1 <= len(start_id) <= 128 and SPEC_START_ID.fullmatch(start_id) is not None


def is_control(ch: str) -> bool:
    """Unicode's control characters (category Cc: C0, DEL and C1)."""
    return unicodedata.category(ch) == "Cc"


def spec_user_name_ok(name: str) -> bool:
    """1 to 255 characters, no control characters and no "/"."""
    return 1 <= len(name) <= 255 and "/" not in name and not any(is_control(c) for c in name)


def finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON-like value."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def depth(value) -> int:
    """Nesting depth of a JSON-like value (a flat dict is 1), like Struct's."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def field_matches(got: str, allowed: set[str]) -> bool:
    """``env[K]`` is a field of ``env``, ``internal_ssl.ca_pem`` one of ``internal_ssl``."""
    return any(got == a or got.startswith(a + "[") or got.startswith(a + ".") for a in allowed)


@dataclass
class Case:
    """One drawn StartRequest and what the spec says about its fields."""

    request: pb.StartRequest
    invalid: set[str] = field(default_factory=set)  # malformed per the spec
    maybe: set[str] = field(default_factory=set)  # limits the spec leaves to the Outpost
    overrides: bool = False

    @property
    def size(self) -> int:
        return self.request.ByteSize()


# --- strategies ----------------------------------------------------------------------------

POOL = [f"srv-{i}" for i in range(8)]  # a few names reused often: collisions, attaches
START_IDS = ["s1", "s2", "s3"]
HUGE = st.sampled_from([100, 1_000, 10_000, 60_000, 120_000, 300_000])  # up to beyond LIMIT (262144)



def spliced(good: st.SearchStrategy, bad: str) -> st.SearchStrategy:
    """A good value with one character from `bad` put somewhere in it."""
    return st.builds(
        lambda value, char, at: value[: at % (len(value) + 1)] + char + value[at % (len(value) + 1):],
        good,
        st.sampled_from(bad),
        st.integers(0, 300),
    )


# The hostile strategies draw mostly malformed values (the benign ones below draw the
# well-formed), one field at a time, so that a field's check cannot hide behind another's.
server_names = st.one_of(
    spliced(st.sampled_from(POOL), "/"),  # path tricks get their own branches
    st.builds(str.__add__, st.sampled_from(["../", "/", "./", "..\\", "~/", "%2e%2e/"]), st.sampled_from(POOL)),
    spliced(st.sampled_from(POOL), "/ \\:!#$%&*()[]{}<>?|~`'\"\x00\n\t\x7f\u00fc\u202e\u2028"),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/../../b",
            "/abs",
            "a\\b",
            "-dash",
            "_under",
            "a b",
            "a\x00b",
            "a\nb",
            "a\x7f",
            "a\u202eb",
            "\u00fcnicode",
            "%2e%2e",
            "a:b",
            "CON",
            "a" * 255,
            "b" * 256,
            "c" * 20_000,
        ]
    ),
    st.text(max_size=300),
)

start_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{129,200}", fullmatch=True),
    spliced(st.sampled_from(START_IDS), " /@+:!#$%&*()[]{}<>?|~`'\"\x00\n\t\x7f\u00fc"),
    st.sampled_from(["", "-", ".", "..", "x" * 128, "x" * 129, "a b", "a/b", "\u00fc", "a\x00", "{}"]),
    st.text(max_size=150),
)

user_names = st.one_of(
    spliced(st.sampled_from(["alice", "\u00fc" * 254]), "/\x00\x01\n\r\t\x1b\x7f\x85\x9f"),
    st.sampled_from(
        [
            "alice",
            "",
            "a/b",
            "..",
            "x" * 255,
            "x" * 256,
            "\u00fc" * 255,
            "a\x00",
            "a\x1b[31mred",
            "a\tb",
            "a\u2028b",
            "\u202e",
            "null",
            "{user}",
            "%s%n",
        ]
    ),
    st.text(max_size=300),
)

groups = st.one_of(
    st.lists(st.sampled_from(["staff", "gpu", "a/b", "\u00fcber"]), max_size=4),
    st.lists(st.text(max_size=40), max_size=5),
    st.sampled_from([[""], ["x" * 256], ["a\x00"], ["a\nb"], ["g"] * 1001, ["g"] * 1000]),
)

users = st.one_of(
    st.none(),
    st.builds(
        lambda name, uid, admin, gs: pb.User(name=name, id=uid, admin=admin, groups=gs),
        user_names,
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        groups,
    ),
)

env_keys = st.one_of(
    st.sampled_from(
        [
            "JUPYTERHUB_API_TOKEN",
            "JUPYTERHUB_API_URL",
            "JUPYTERHUB_BASE_URL",
            "JUPYTERHUB_SERVICE_PREFIX",
            "JUPYTERHUB_HOST",
            "JUPYTERHUB_CLIENT_ID",
            "JUPYTERHUB_SERVICE_URL",
            "JUPYTERHUB_USER",
            "PATH",
            "HOME",
            "LD_PRELOAD",
            "",
            "=",
            "A=B",
            "A\x00",
            "\x00",
            " ",
            "\n",
            "\u00fc",
            "x" * 1024,
            "y" * 1025,
        ]
    ),
    st.text(max_size=30),
)

env_values = st.one_of(
    st.text(max_size=50),
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "=",
            "://",
            "http://[::1",
            "http://%zz/",
            "/",
            "//",
            "../../..",
            "{user}",
            "%s",
            "\u00fc",
            "\r\n",
        ]
    ),
    st.builds(lambda ch, n: ch * n, st.sampled_from(["v", "\u20ac"]), HUGE),
)

BAD_ENV = [{"": "x"}, {"=": ""}, {"A=B": "x"}, {"A\x00": "x"}, {"\x00": ""}, {"OK": "a\x00b"}, {"OK": "\x00"}]
envs = st.one_of(
    st.builds(lambda env, bad: {**env, **bad}, st.dictionaries(env_keys, env_values, max_size=4),
              st.sampled_from(BAD_ENV)),
    st.dictionaries(env_keys, env_values, max_size=8),
    st.integers(0, 3000).map(lambda n: {f"K{i}": str(i) for i in range(n)}),
)

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60),
    st.text(max_size=20),
    st.builds(lambda n: "s" * n, HUGE),
)

json_trees = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def chain(levels: int, shape: str, leaf) -> dict:
    """A dict nested `levels` deep (lists, dicts or both on the way)."""
    node = leaf
    for i in range(levels - 1, 0, -1):
        as_list = shape == "list" or (shape == "mixed" and i % 2)
        node = [node] if as_list else {"k": node}
    return {"top": node}


SHAPES = st.sampled_from(["dict", "list", "mixed"])
structs = st.one_of(
    st.dictionaries(st.text(max_size=10), json_trees, max_size=5),
    st.builds(chain, st.integers(DEPTH + 1, DEPTH + 20), SHAPES, json_leaves),  # deeper than allowed
    st.builds(chain, st.integers(DEPTH + 1, 120), SHAPES, json_leaves),  # and than protobuf parses
)

internal_ssl = st.sampled_from(["none", "pem", "partial", "garbage"])
spawner_names = st.one_of(
    st.just(""),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,20}", fullmatch=True),
    st.sampled_from(["a b", "\u00fc", "x" * 256, "a/b", "-x", "a\x00"]),
)


# Well-formed per the spec, and still odd: unicode, bidi and line separators, huge values,
# thousands of keys, nesting up to the limit. Most fields of a drawn request come from here,
# so that hostile values in one or two fields meet a request that is otherwise fine.
FIELDS = ("server_name", "start_id", "user", "env", "user_options", "config_overrides", "internal_ssl",
          "spawner_name")
no_ascii_controls = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/")
benign = {
    "server_name": st.one_of(
        st.sampled_from(POOL),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,40}", fullmatch=True),
        st.sampled_from(["a" * 255, "0", "a..b", "a@b+c-d.e_f", "CON"]),
    ),
    "start_id": st.one_of(
        st.sampled_from(START_IDS),
        st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
        st.sampled_from(["-", ".", "..", "x" * 128]),
    ),
    "user": st.builds(
        lambda name, uid, admin, gs: pb.User(name=name, id=uid, admin=admin, groups=gs),
        st.one_of(
            st.sampled_from(["alice", "\u00fc" * 255, "a\u2028b", "\u202e", "{user}", "%s%n", "..", "a b", "\x80\x85"]),
            st.text(no_ascii_controls, min_size=1, max_size=255),
        ),
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.lists(st.sampled_from(["staff", "gpu", "a/b", "\u00fcber", "x" * 255]), max_size=4),
    ),
    "env": st.one_of(
        st.dictionaries(
            st.one_of(
                st.sampled_from(["JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL", "JUPYTERHUB_BASE_URL",
                                 "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_HOST", "JUPYTERHUB_CLIENT_ID",
                                 "JUPYTERHUB_SERVICE_URL", "PATH", "HOME", "LD_PRELOAD", " ", "\n", "x" * 1024]),
                st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=\x00"),
                        min_size=1, max_size=30),
            ),
            st.one_of(
                st.sampled_from(["", "=", "://", "http://[::1", "http://%zz/", "//", "../../..", "{user}", "\r\n"]),
                st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=50),
                st.builds(lambda ch, n: ch * n, st.sampled_from(["v", "\u20ac"]), HUGE),
            ),
            max_size=8,
        ),
        st.integers(0, 3000).map(lambda n: {f"K{i}": str(i) for i in range(n)}),
    ),
    "user_options": st.one_of(
        st.just({}),
        st.dictionaries(st.text(max_size=10), json_trees, max_size=5).filter(lambda d: depth(d) <= DEPTH),
        st.builds(chain, st.integers(1, DEPTH), SHAPES, json_leaves),
    ),
    "config_overrides": st.one_of(  # mostly none; some that the default policy denies
        st.just({}),
        st.just({}),
        st.dictionaries(st.sampled_from(["image", "cmd", "mem_limit", "start_timeout"]), json_leaves,
                        min_size=1, max_size=2),
    ),
    "internal_ssl": st.sampled_from(["none", "pem"]),
    "spawner_name": st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,20}", fullmatch=True)),
}
hostile = {
    "server_name": server_names,
    "start_id": start_ids,
    "user": users,
    "env": envs,
    "user_options": structs,
    "config_overrides": structs,
    "internal_ssl": internal_ssl,
    "spawner_name": spawner_names,
}


@st.composite
def start_cases(draw) -> Case:
    how_many = draw(st.sampled_from([0, 1, 1, 1, 2]))
    weighted = st.sampled_from(FIELDS + ("server_name", "start_id", "user", "env", "user_options"))
    odd = set(draw(st.lists(weighted, min_size=how_many, max_size=how_many, unique=True)))
    drawn = {name: draw(hostile[name] if name in odd else benign[name]) for name in FIELDS}
    name, start_id, user, env = drawn["server_name"], drawn["start_id"], drawn["user"], drawn["env"]
    options, overrides, certs = drawn["user_options"], drawn["config_overrides"], drawn["internal_ssl"]
    spawner_name = drawn["spawner_name"]

    request = pb.StartRequest(
        server_name=name,
        start_id=start_id,
        env=env,
        spawner_name=spawner_name,
        wait_until_ready=draw(st.booleans()),
    )
    case = Case(request)
    if user is not None:
        request.user.CopyFrom(user)
    if options:
        request.user_options.update(options)
    if overrides:
        request.config_overrides.update(overrides)
    case.overrides = bool(overrides)

    if not spec_server_name_ok(name):
        case.invalid.add("server_name")
    if not spec_start_id_ok(start_id):
        case.invalid.add("start_id")
    if user is None:
        case.invalid.add("user")
    else:
        if not spec_user_name_ok(user.name):
            case.invalid.add("user.name")
        strange = [g for g in user.groups if not g or len(g) > 255 or any(unicodedata.category(c) == "Cc" for c in g)]
        if strange or len(user.groups) > 1000:
            case.maybe.add("user.groups")  # the spec sets no limits on groups
    for key, value in env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            case.invalid.add("env")
        elif len(key) > 1024:
            case.maybe.add("env")  # the spec sets no length limit on keys
    if spawner_name and not spec_server_name_ok(spawner_name):
        case.maybe.add("spawner_name")  # the spec says nothing about its characters
    # how deep is documented by the Outpost's configuration, not the proto
    if depth(options) > DEPTH:
        case.invalid |= {"user_options", "request"}
    if depth(overrides) > DEPTH:
        case.invalid |= {"config_overrides", "request"}
    # the proto: numbers in user_options and config_overrides are finite (JSON has no NaN)
    if not finite(options):
        case.invalid.add("user_options")
    if not finite(overrides):
        case.invalid.add("config_overrides")
    if certs == "pem":
        request.internal_ssl.CopyFrom(
            pb.InternalSslCertificates(
                key_pem=PEM.format("PRIVATE KEY"), cert_pem=PEM.format("CERTIFICATE"), ca_pem=PEM.format("CERTIFICATE")
            )
        )
    elif certs == "partial":
        request.internal_ssl.cert_pem = PEM.format("CERTIFICATE")
        case.invalid.add("internal_ssl")
    elif certs == "garbage":
        request.internal_ssl.CopyFrom(pb.InternalSslCertificates(key_pem="k", cert_pem="c", ca_pem="\x00"))
        case.invalid.add("internal_ssl")
    return case


# --- the Outpost under attack ----------------------------------------------------------------


@dataclass
class World:
    op: object
    attacker: OutpostClient  # may send more than the Outpost accepts
    other: OutpostClient  # a well-behaved hub client on its own channel
    steady: str  # its running server
    model: dict[str, str] = field(default_factory=dict)  # server_name -> start_id
    stats: Counter = field(default_factory=Counter)
    slowest: tuple[float, str] = (0.0, "")  # the slowest hostile Start, and what it was
    served: float = 0.0  # the slowest answer to the well-behaved client


def plain_account(hub: str, name: str) -> str:
    """Any hub user name as a plain local account name (c.Outpost.user_mapping)."""
    return "u" + hashlib.sha256(name.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
async def world(tmp_path_factory):
    # what any env and user_options key may do to the site is the allow policies' business
    # (tests/test_policies.py), which local account a user name becomes the accounts'
    # (tests/test_accounts.py); here every key is allowed and every name maps to a plain
    # account, so the shapes and sizes reach the Outpost's validation and its database
    cfg = outpost_config(
        tmp_path_factory.mktemp("hostile"), INSTANT, max_message_bytes=LIMIT, poll_interval=0.2,
        allow_env=True, allow_user_options=True, user_mapping=plain_account,
    )  # fmt: skip
    async with running_outpost(cfg) as op:
        attacker = OutpostClient(op.address, max_message_bytes=16 * 1024 * 1024, timeout=30)
        other = OutpostClient(op.address, timeout=30)
        try:
            steady_id = sid()
            await other.start("steady", steady_id, user_name="steady", wait_until_ready=True)
            yield World(op, attacker, other, "steady", model={"steady": steady_id})
        finally:
            await attacker.close()
            await other.close()


async def call(method, request, timeout: float = 30):
    """(code, response or OutpostError)."""
    try:
        return grpc.StatusCode.OK, await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code(), from_rpc_error(e)


def check_error_shape(code, error: OutpostError) -> None:
    assert code in ALLOWED, f"{code.name}: {error.message!r} ({error.metadata})"
    assert "Traceback" not in error.message
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error.reason == "INVALID_FIELD", error
        assert error.field, f"INVALID_ARGUMENT without a field: {error.message!r}"
        root = re.split(r"[.\[]", error.field)[0]
        assert error.message.startswith(root), f"message does not name {error.field!r}: {error.message!r}"


async def keep_serving(world: World) -> float:
    """What the well-behaved client does while the attacker sends (returns its latency)."""
    started = time.perf_counter()
    status = await world.other.poll(world.steady)
    assert status.state == pb.SERVER_STATE_RUNNING
    page = await world.other.stub.ListServers(pb.ListServersRequest(page_size=5), timeout=30)
    assert page.servers
    return time.perf_counter() - started


async def quiescent(op) -> None:
    """No start, stop or database write under way: memory and database should agree."""

    def settled() -> bool:
        for rec in op.manager.records.values():
            if rec.accepted is not None or rec.state not in (pb.SERVER_STATE_RUNNING, pb.SERVER_STATE_STOPPED):
                return False
            if rec.run is not None or (rec.stop_task is not None and not rec.stop_task.done()):
                return False
        return not op.app.store._queue

    await wait_for(settled, timeout=15, message="the Outpost did not settle")


def canon(value) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=True)


async def assert_database_matches_memory(op) -> int:
    await quiescent(op)
    rows, events = await op.app.store.load()
    stored = {(r["hub"], r["server_name"]): r for r in rows}
    assert set(stored) == set(op.manager.records)
    for key, rec in op.manager.records.items():
        row = stored[key]
        assert row["start_id"] == rec.start_id
        assert row["state"] == STATE_NAMES[rec.state], key
        assert canon(row["env"]) == canon(rec.spec.env)
        assert canon(row["user_options"]) == canon(rec.spec.user_options)
        assert canon(row["config_overrides"]) == canon(rec.spec.config_overrides)
        assert canon(row["user_info"]) == canon(rec.spec.user)
        assert row["spawner_name"] == rec.spec.spawner_name
        # what is persisted is what validation lets in
        validation.check_server_name(row["server_name"])
        validation.check_start_id(row["start_id"], required=True)
        validation.check_user_name(row["user_info"]["name"])
        validation.check_env(row["env"])
        assert depth(row["user_options"]) <= DEPTH and depth(row["config_overrides"]) <= DEPTH
        # "The Outpost never writes them [internal_ssl] to its database"
        assert "-----BEGIN" not in canon({k: v for k, v in row.items() if k not in ("start_time", "updated")})
        evs = events.get(key, [])
        assert [e["sequence"] for e in evs] == sorted({e["sequence"] for e in evs})
        assert all(e["start_id"] == rec.start_id for e in evs)
        if evs:
            assert evs[-1]["sequence"] == rec.last_sequence
    assert set(events) <= set(stored)
    return len(rows)


# --- the property ------------------------------------------------------------------------------


@HYPOTHESIS
@given(case=start_cases(), stop_after=st.integers(0, 5))
async def test_hostile_start_requests(world, case, stop_after):
    request, model = case.request, world.model
    started = time.perf_counter()
    (code, answer), *served = await asyncio.gather(
        call(world.attacker.stub.Start, request), keep_serving(world), keep_serving(world)
    )
    took = time.perf_counter() - started
    if took > world.slowest[0]:
        world.slowest = (took, f"{code.name}, {case.size} bytes, odd fields {sorted(case.invalid | case.maybe)}")
    world.served = max(world.served, *served)
    world.stats[code.name] += 1
    name, start_id = request.server_name, request.start_id
    if code != grpc.StatusCode.OK:
        check_error_shape(code, answer)

    if case.size > LIMIT:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (case.size, code, answer)
        return
    assert code != grpc.StatusCode.RESOURCE_EXHAUSTED or answer.reason == TOO_MANY_STARTS, (case.size, answer)
    if case.invalid:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (case.invalid, code, answer)
        assert field_matches(answer.field, case.invalid | case.maybe), (case.invalid, case.maybe, answer)
        world.stats["invalid:" + re.split(r"[.\[]", answer.field)[0]] += 1
        return
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # only a field whose limits the spec leaves open may be refused
        assert field_matches(answer.field, case.maybe), (
            f"a request the spec calls valid was refused: {answer!r}; maybe={case.maybe}"
        )
        world.stats["refused-open:" + answer.field.split("[")[0]] += 1
        return

    # a well-formed request: the lifecycle decides
    current = model.get(name)
    if current == start_id:
        assert code == grpc.StatusCode.OK, answer
        assert not answer.created and answer.status.start_id == start_id
    elif current is not None:
        assert code == grpc.StatusCode.FAILED_PRECONDITION, answer
        assert answer.reason == "SERVER_ALREADY_STARTED" and answer.metadata["start_id"] == current
    elif case.overrides:
        assert code == grpc.StatusCode.PERMISSION_DENIED, answer
        assert answer.reason == "OVERRIDE_NOT_ALLOWED"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pass  # TOO_MANY_STARTS (checked above): a limit, not a crash
    else:
        assert code == grpc.StatusCode.OK, answer
        assert answer.created and answer.status.start_id == start_id
        model[name] = start_id

    if code == grpc.StatusCode.OK:
        status = answer.status
        assert status.server_name == name
        if answer.created:  # an attach answers with the first start's user
            assert status.user_name == request.user.name
        if request.wait_until_ready:
            assert status.state == pb.SERVER_STATE_RUNNING, status
        else:
            assert status.state in ACTIVE, status
        # the other client sees it too
        assert (await world.other.poll(name)).start_id == start_id
        if stop_after == 0 and name != world.steady:
            stop = await world.other.stop(name, start_id)
            assert stop.outcome == pb.STOP_OUTCOME_STOPPED
            del model[name]
    elif current is None:
        # a refused start leaves nothing behind
        assert (HUB, name) not in world.op.manager.records
    if code == grpc.StatusCode.OK or current is not None:
        await assert_database_matches_memory(world.op)


# --- hostile bytes -------------------------------------------------------------------------------


def raw_unary(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(SERVICE + method)  # bytes in, bytes out


RICH = pb.StartRequest(
    server_name="mutant",
    start_id="m1",
    user=pb.User(name="mallory", id=7, groups=["g"]),
    env={"JUPYTERHUB_API_TOKEN": "t", "K": "v"},
    spawner_name="lab",
)
RICH.user_options.update({"a": [1, {"b": "c"}], "d": {"e": {"f": True}}})
RICH_BYTES = RICH.SerializeToString()


@settings(HYPOTHESIS, max_examples=100)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda cut, flips: bytes(
                (b ^ flips.get(i, 0)) for i, b in enumerate(RICH_BYTES[: cut or None])
            ),
            st.integers(0, len(RICH_BYTES)),
            st.dictionaries(st.integers(0, len(RICH_BYTES) - 1), st.integers(1, 255), max_size=4),
        ),
    )
)
async def test_hostile_bytes(world, data):
    """Whatever bytes arrive: a clean answer, and the other client is served."""
    start = raw_unary(world.attacker.channel, "Start")
    (code, answer), _ = await asyncio.gather(call(start, data), keep_serving(world))
    if code != grpc.StatusCode.OK:
        check_error_shape(code, answer)
    else:
        status = pb.StartResponse.FromString(answer).status  # bytes that happened to be a good request
        world.model.setdefault(status.server_name, status.start_id)


@pytest.mark.parametrize(
    "method, data",
    [
        ("Start", RICH_BYTES.replace(b"mutant", b"mu\xfftant")),  # invalid UTF-8: server_name
        ("Start", RICH_BYTES.replace(b"mallory", b"mall\xc3ry")),  # in user.name
        ("Start", RICH_BYTES.replace(b"JUPYTERHUB_API_TOKEN", b"JUPYTERHUB_API_TOKE\xed")),  # env key
        ("Start", RICH_BYTES[:-3]),  # truncated
        ("Start", b"\x0a\xff\xff\xff\xff\x0f"),  # a length far beyond the message
        ("Start", b"\xff" * 64),
        ("Start", b"\x0f"),  # field 1 with the invalid wire type 7
        ("Poll", pb.PollRequest(server_name="ok").SerializeToString().replace(b"ok", b"\xc0\xaf")),
        ("Stop", b"\x12\x80"),
        ("ListServers", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),  # an overlong varint
    ],
)
async def test_undecodable_requests_are_invalid_argument(world, method, data):
    code, answer = await call(raw_unary(world.attacker.channel, method), data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, answer)
    assert answer.field == "request" and answer.message.startswith("request: could not be decoded")
    await keep_serving(world)


async def test_undecodable_events_request(world):
    stream = world.attacker.channel.unary_stream(SERVICE + "Events")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream(b"\x0a\x02\xff\xfe", timeout=10):
            pass
    error = from_rpc_error(err.value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.field == "request"


@settings(HYPOTHESIS, max_examples=100)
@given(name=server_names, start_id=start_ids, after=st.integers(0, 2**64 - 1))
async def test_hostile_names_on_the_other_rpcs(world, name, start_id, after):
    """Poll, Events and Stop with the same hostile names: INVALID_ARGUMENT naming the field,
    or the answer for a server that does (not) exist."""
    valid = spec_server_name_ok(name)
    sid_ok = not start_id or spec_start_id_ok(start_id)  # optional in these RPCs
    code, answer = await call(world.attacker.stub.Poll, pb.PollRequest(server_name=name))
    if not valid:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and answer.field == "server_name", answer
    elif name in world.model:
        assert code == grpc.StatusCode.OK and answer.status.start_id == world.model[name]
    else:
        assert code == grpc.StatusCode.NOT_FOUND and answer.reason == "SERVER_NOT_FOUND", answer

    events = world.attacker.stub.Events(
        pb.EventsRequest(server_name=name, start_id=start_id, after_sequence=after), timeout=10
    )
    try:
        async for event in events:
            assert event.sequence > after
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        code, answer = e.code(), from_rpc_error(e)
        assert "Traceback" not in answer.message
    if not valid or not sid_ok:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and answer.field in ("server_name", "start_id"), answer
    elif name in world.model:
        expect = grpc.StatusCode.OK if start_id in ('', world.model[name]) else grpc.StatusCode.NOT_FOUND
        assert code == expect, (code, answer)
    else:
        assert code == grpc.StatusCode.NOT_FOUND

    if name not in world.model:  # never stop a server the property made
        code, answer = await call(world.attacker.stub.Stop, pb.StopRequest(server_name=name, start_id=start_id))
        if not valid or not sid_ok:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and answer.field in ("server_name", "start_id")
        else:
            assert code == grpc.StatusCode.OK and answer.outcome == pb.STOP_OUTCOME_NOT_FOUND
    await keep_serving(world)


async def test_database_matches_memory_after_hostile_load(world, tmp_path):
    """Runs after the tests above (file order): memory, database and a restore agree."""
    op = world.op
    count = await assert_database_matches_memory(op)
    assert {n for (_, n) in op.manager.records} == set(world.model)
    await keep_serving(world)
    took, what = world.slowest
    print(
        f"\nhostile load: {dict(world.stats)}; {count} rows; slowest hostile Start {took * 1e3:.0f} ms "
        f"({what}); slowest answer to the other client {world.served * 1e3:.0f} ms"
    )

    # what was persisted restores into the same servers (a copy: the live one keeps going)
    source = op.app.store.url.split("///", 1)[1]
    copy = source + ".restore-copy"
    with sqlite3.connect(source) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    app = Outpost(config=outpost_config(tmp_path, INSTANT, db_url=f"sqlite:///{copy}"))
    try:
        await app.init_store()
        await app.init_manager()
        await app.init_servers()  # restores, as a restarted Outpost does
        assert set(app.manager.records) == set(op.manager.records)
        for key, rec in op.manager.records.items():
            back = app.manager.records[key]
            assert (back.start_id, back.state) == (rec.start_id, rec.state)
            assert canon(back.spec.env) == canon(rec.spec.env)
            assert canon(back.spec.user_options) == canon(rec.spec.user_options)
    finally:
        await app.cleanup()


# --- the limits, explicitly ------------------------------------------------------------------------


def padded_start(name: str, size: int) -> pb.StartRequest:
    """A valid StartRequest of exactly `size` bytes (padding in an env value)."""
    request = pb.StartRequest(server_name=name, start_id=sid(), user=pb.User(name="pad"))
    base = request.ByteSize()
    for pad in range(max(0, size - base - 16), size - base + 1):
        for key in ("PAD", "PAD_"):  # a varint length may jump past `size`: vary the key
            request.env.clear()
            request.env[key] = "p" * pad
            if request.ByteSize() == size:
                return request
    raise AssertionError(f"cannot pad to {size}")


async def test_message_size_limit_refused_while_others_served(start_outpost):
    limit = 16 * 1024
    async with start_outpost(INSTANT, max_message_bytes=limit, allow_env=True, allow_user_options=True) as op:
        other = OutpostClient(op.address)
        attacker = OutpostClient(op.address, max_message_bytes=8 * 1024 * 1024)
        try:
            await other.start("steady", sid(), user_name="steady", wait_until_ready=True)

            # the boundary: exactly the limit is accepted, one byte more is not
            code, answer = await call(attacker.stub.Start, padded_start("at-limit", limit))
            assert code == grpc.StatusCode.OK and answer.created
            code, answer = await call(attacker.stub.Start, padded_start("over-limit", limit + 1))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer
            assert "Traceback" not in answer.message

            big = "x" * (limit + 1)
            deep = pb.StartRequest(server_name="big-struct", start_id=sid(), user=pb.User(name="u"))
            deep.user_options.update({"blob": big})
            oversized = [
                pb.StartRequest(server_name="big-env", start_id=sid(), user=pb.User(name="u"), env={"A": big}),
                pb.StartRequest(server_name="big-keys", start_id=sid(), user=pb.User(name="u"),
                                env={f"K{i}": "v" for i in range(3000)}),
                pb.StartRequest(server_name="big-groups", start_id=sid(), user=pb.User(name="u", groups=["g"] * 9000)),
                pb.StartRequest(server_name=big, start_id=sid(), user=pb.User(name="u")),
                deep,
            ]
            assert all(r.ByteSize() > limit for r in oversized)
            flood = [call(attacker.stub.Start, r) for r in oversized * 4]
            flood.append(call(attacker.stub.Poll, pb.PollRequest(server_name=big)))
            polls = [other.poll("steady") for _ in range(20)]
            results = await asyncio.gather(*flood, *polls)
            for code, answer in results[: len(flood)]:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, answer)
            assert all(s.state == pb.SERVER_STATE_RUNNING for s in results[len(flood):])

            # nothing of the refused starts anywhere; the attacker's channel still works
            names = {n for (_, n) in op.manager.records}
            assert names == {"steady", "at-limit"}
            await assert_database_matches_memory(op)
            assert (await attacker.poll("at-limit")).state in ACTIVE
        finally:
            await other.close()
            await attacker.close()


def nested(levels: int, shape: str) -> dict:
    return chain(levels, shape, "leaf")


async def test_struct_depth_limits(start_outpost):
    """Up to max_struct_depth: accepted; deeper: INVALID_ARGUMENT naming the field; deeper
    than protobuf parses (about 35 dict levels): INVALID_ARGUMENT naming the request."""
    limit = 5
    async with start_outpost(INSTANT, max_struct_depth=limit, allow_user_options=True) as op:
        other = OutpostClient(op.address)
        try:
            await other.start("steady", sid(), user_name="steady", wait_until_ready=True)
            seen: dict[str, list[str]] = {}
            for shape in ("dict", "list", "mixed"):
                answers = []
                for levels in range(1, 121):
                    request = pb.StartRequest(
                        server_name=f"{shape}-{levels}", start_id=sid(), user=pb.User(name="u")
                    )
                    request.user_options.update(nested(levels, shape))
                    (code, answer), status = await asyncio.gather(
                        call(op.client.stub.Start, request), other.poll("steady")
                    )
                    assert status.state == pb.SERVER_STATE_RUNNING
                    if levels <= limit:
                        assert code == grpc.StatusCode.OK, (levels, answer)
                        answers.append("ok")
                        continue
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (shape, levels, code, answer)
                    check_error_shape(code, answer)
                    assert answer.field in ("user_options", "request"), answer
                    if answer.field == "user_options":
                        assert f"nested {levels} levels deep; at most {limit}" in answer.message
                    answers.append(answer.field)
                # ok..., user_options..., request... in this order, each present
                assert answers == sorted(answers, key=["ok", "user_options", "request"].index)
                assert {"ok", "user_options", "request"} <= set(answers), (shape, answers)
                seen[shape] = answers
            # config_overrides: too deep is INVALID_ARGUMENT before the policy says no
            for levels, expect in ((limit, grpc.StatusCode.PERMISSION_DENIED), (limit + 1, grpc.StatusCode.INVALID_ARGUMENT),
                                   (120, grpc.StatusCode.INVALID_ARGUMENT)):
                request = pb.StartRequest(server_name="ovr", start_id=sid(), user=pb.User(name="u"))
                request.config_overrides.update(nested(levels, "dict"))
                code, answer = await call(op.client.stub.Start, request)
                assert code == expect, (levels, answer)
                check_error_shape(code, answer)
            first_request = {shape: answers.index("request") + 1 for shape, answers in seen.items()}
            print(f"\nprotobuf refuses from depth {first_request}")
            await assert_database_matches_memory(op)
        finally:
            await other.close()

    # a configured limit above protobuf's own still answers INVALID_ARGUMENT, not INTERNAL
    async with start_outpost(INSTANT, max_struct_depth=1000, allow_user_options=True) as op:
        request = pb.StartRequest(server_name="deep", start_id=sid(), user=pb.User(name="u"))
        request.user_options.update(nested(120, "mixed"))
        code, answer = await call(op.client.stub.Start, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and answer.field == "request", answer
        request = pb.StartRequest(server_name="deep-ok", start_id=sid(), user=pb.User(name="u"))
        request.user_options.update(nested(30, "dict"))
        code, answer = await call(op.client.stub.Start, request, timeout=30)
        assert code == grpc.StatusCode.OK, answer


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
async def test_non_finite_numbers_in_user_options(start_outpost, db_url, number):
    """A Struct may carry NaN and +-Infinity (protobuf doubles), which JSON, and so the
    database (PostgreSQL's json type), cannot store: INVALID_ARGUMENT naming the field,
    never UNAVAILABLE (no retry could ever succeed), and nothing stored."""
    async with start_outpost(INSTANT, db_url=db_url) as op:
        request = pb.StartRequest(server_name="nan", start_id=sid(), user=pb.User(name="u"))
        request.user_options.update({"x": number})
        code, answer = await call(op.client.stub.Start, request)
        await assert_database_matches_memory(op)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, answer)
        assert answer.field == "user_options", answer
        assert "nan" not in {n for (_, n) in op.manager.records}


def test_oracle_matches_its_spec_sentences():
    """The oracle itself, on the proto's examples (so a wrong oracle fails loudly)."""
    assert spec_server_name_ok("a" * 255) and not spec_server_name_ok("a" * 256)
    assert not spec_server_name_ok("-a") and spec_server_name_ok("a-._@+")
    assert not spec_server_name_ok("\u00fc") and not spec_server_name_ok("a\n")
    assert spec_start_id_ok("-") and not spec_start_id_ok("x" * 129) and not spec_start_id_ok("a\n")
    assert not spec_user_name_ok("a/b") and spec_user_name_ok("\u00fc" * 255)
    assert depth({}) == 1 and depth(nested(7, "mixed")) == 7
    struct = struct_pb2.Struct()
    struct.update(nested(9, "list"))
    assert validation.struct_depth(struct) == 9
