"""Pure builders and checks, without sockets."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets.config import Config

from outpost_client import InvalidArgument, pb
from outpost_server import convert, validation
from outpost_server.hosting import (
    DEFAULT_SITE_ENV_KEYS,
    make_spawner,
    normalise_address,
    stand_ins_from_env,
)
from outpost_server.store import async_url

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["a", "alice", "alice@example.org", "a.b_c-d+e", "9" * 255])
def test_server_name_ok(name):
    assert validation.check_server_name(name) == name


@pytest.mark.parametrize("name", ["", "_a", "a b", "a/b", "a:b", "ä", "a" * 256, "a\x00"])
def test_server_name_bad(name):
    with pytest.raises(InvalidArgument) as err:
        validation.check_server_name(name)
    assert err.value.field == "server_name"


def test_struct_depth():
    s = struct_pb2.Struct()
    assert validation.struct_depth(s) == 1
    s.update({"a": {"b": [1, {"c": 2}]}})
    assert validation.struct_depth(s) == 4


def test_struct_numbers_become_ints_where_integral():
    s = convert.python_to_struct({"port": 8888, "ratio": 0.5, "nested": {"n": [1, 2.5]}, "none": None})
    assert convert.struct_to_python(s) == {"port": 8888, "ratio": 0.5, "nested": {"n": [1, 2.5]}, "none": None}


def test_start_spec_from_request():
    req = pb.StartRequest(
        server_name="alice-gpu",
        start_id="s-1",
        user=pb.User(name="alice", id=3, admin=True, groups=["g"]),
        env={"A": "1"},
        spawner_name="gpu",
    )
    req.user_options.update({"profile": "big"})
    spec = convert.start_spec_from_request(req, max_depth=16)
    assert spec.user == {"name": "alice", "id": 3, "admin": True, "groups": ["g"]}
    assert spec.user_options == {"profile": "big"}
    assert spec.spawner_name == "gpu" and spec.env == {"A": "1"}


def test_start_spec_requires_user():
    with pytest.raises(InvalidArgument) as err:
        convert.start_spec_from_request(pb.StartRequest(server_name="a", start_id="b"), max_depth=16)
    assert err.value.field == "user"


def test_certificates_all_or_nothing():
    certs = pb.InternalSslCertificates(key_pem="-----BEGIN KEY-----")
    with pytest.raises(InvalidArgument):
        validation.check_certificates(certs)


def test_page_token_round_trip():
    assert convert.decode_page_token(convert.encode_page_token("alice")) == "alice"
    with pytest.raises(InvalidArgument):
        convert.decode_page_token("bm9wZQ==")


def test_event_from_spawner_normalises():
    assert convert.event_from_spawner({"progress": 250, "message": "hi", "html_message": "<b>hi</b>"}) == {
        "kind": pb.EVENT_KIND_PROGRESS,
        "message": "hi",
        "html_message": "<b>hi</b>",
        "progress": 100,
    }
    assert convert.event_from_spawner("plain")["message"] == "plain"


def test_normalise_address():
    sp = type("S", (), {"internal_ssl": False, "ip": "10.0.0.5", "port": 9999})()
    assert normalise_address(("1.2.3.4", 80), sp) == ("http", "1.2.3.4", 80)
    assert normalise_address("https://node7:8443/x", sp) == ("https", "node7", 8443)
    assert normalise_address(None, sp) == ("http", "10.0.0.5", 9999)
    assert normalise_address(("", 5), sp) == ("http", "127.0.0.1", 5)
    with pytest.raises(ValueError):
        normalise_address(("h", 70000), sp)


def test_async_url():
    assert async_url("sqlite:///x.sqlite") == "sqlite+aiosqlite:///x.sqlite"
    assert async_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert async_url("postgresql+asyncpg://u@h/db") == "postgresql+asyncpg://u@h/db"


def test_hosted_env_hub_wins_except_site_keys():
    cfg = Config()
    cfg.Spawner.environment = {"SITE_ONLY": "site", "SHARED": "site"}
    env = {
        "JUPYTERHUB_API_TOKEN": "tok",
        "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
        "JUPYTERHUB_SERVICE_URL": "http://hub-side:1/user/alice/",
        "SHARED": "hub",
        "HUB_ONLY": "hub",
    }
    user, hub = stand_ins_from_env(env, "alice", 1, False, ["staff"])
    sp = make_spawner(
        SimpleLocalProcessSpawner,
        config=cfg,
        spawner_name="gpu",
        user=user,
        hub=hub,
        env=env,
        user_options={"a": 1},
        site_env_keys=frozenset(DEFAULT_SITE_ENV_KEYS),
    )
    assert sp.name == "gpu" and sp.user.name == "alice" and sp.user_options == {"a": 1}
    assert sp.hub.api_url == "http://hub:8081/hub/api"
    assert [g.name for g in sp.user.groups] == ["staff"]
    out = sp.get_env()
    assert out["JUPYTERHUB_API_TOKEN"] == "tok"
    assert out["HUB_ONLY"] == "hub"
    assert out["SHARED"] == "site"  # the site's environment config wins for its own keys
    assert out["SITE_ONLY"] == "site"
    assert out["JUPYTERHUB_SERVICE_URL"].startswith("http://")
    assert "hub-side" not in out["JUPYTERHUB_SERVICE_URL"]  # the site knows where it binds
    assert out["HOME"] == "/tmp/alice"


# --- allow_override ------------------------------------------------------------------------

from outpost_server.policy import check_policy, denied_keys  # noqa: E402


@pytest.mark.parametrize(
    "policy, hub, overrides, denied",
    [
        (False, "a", {"image": 1}, ["image"]),
        (True, "a", {"image": 1, "cmd": 2}, []),
        (["image"], "a", {"image": 1, "cmd": 2}, ["cmd"]),
        ({"a": True, "b": ["mem_limit"]}, "a", {"image": 1}, []),
        ({"a": True, "b": ["mem_limit"]}, "b", {"image": 1, "mem_limit": 2}, ["image"]),
        ({"a": True}, "stranger", {"image": 1}, ["image"]),
        (lambda hub, o: hub == "a", "a", {"image": 1}, []),
        (lambda hub, o: hub == "a", "b", {"image": 1}, ["image"]),
        (lambda hub, o: ["image"] if o.get("image", "").startswith("site/") else [], "a", {"image": "evil/x"}, ["image"]),
        ({"a": lambda hub, o: True}, "a", {"x": 1}, []),
    ],
)
async def test_denied_keys(policy, hub, overrides, denied):
    assert await denied_keys(check_policy(policy), hub, overrides) == denied


async def test_async_policy():
    async def policy(hub, overrides):
        return ["image"]

    assert await denied_keys(policy, "a", {"image": 1, "cmd": 2}) == ["cmd"]


@pytest.mark.parametrize("bad", [3, "image", {"a": {"b": True}}, [1, 2]])
def test_bad_policy(bad):
    with pytest.raises(ValueError):
        check_policy(bad)


def test_start_marker_is_stable_and_distinct():
    from outpost_server.orphans import find_marked, start_marker

    m = start_marker("hub", "srv", "s1")
    assert m == start_marker("hub", "srv", "s1") and len(m) == 32
    assert len({m, start_marker("hub", "srv", "s2"), start_marker("hub2", "srv", "s1")}) == 3
    assert find_marked({m}) == {}  # no process carries it


def test_hosted_spawner_db_is_a_stand_in():
    """batchspawner's start() calls self.db.commit(): a hosted Spawner's db must take it."""
    user, hub = stand_ins_from_env({}, "amy", 1, False, [])
    spawner = make_spawner(
        SimpleLocalProcessSpawner, config=Config(), spawner_name="", user=user, hub=hub,
        env={}, user_options={}, site_env_keys=frozenset(),
    )  # fmt: skip
    spawner.db.commit()
    spawner.db.rollback()


def test_hosted_spawner_log_hides_the_servers_secrets(caplog):
    """A Spawner that logs its environment (batchspawner does, at DEBUG) shows no token."""
    import logging

    token = "0123456789abcdef0123456789abcdef"
    env = {"JUPYTERHUB_API_TOKEN": token, "JPY_API_TOKEN": token, "MY_SECRET": "hunter22",
           "PIN_PASSWORD": "short", "JUPYTERHUB_USER": "amy"}  # fmt: skip
    user, hub = stand_ins_from_env(env, "amy", 1, False, [])
    log = logging.getLogger("outpost.manager.test.amy")
    spawner = make_spawner(
        SimpleLocalProcessSpawner, config=Config(), spawner_name="", user=user, hub=hub,
        env=env, user_options={}, site_env_keys=frozenset(), log=log,
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger=log.name):
        spawner.log.debug("Spawner submitting environment: %s", spawner.get_env())
        spawner.log.info("token " + token)  # already formatted by the caller
        spawner.log.getChild("sub").warning("%s and %d", "hunter22", 3)
        spawner.log.info("100%% of %s", "amy")
        spawner.log.info("%(who)s has %(what)s", {"who": "amy", "what": token})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in text and "hunter22" not in text, text
    assert "'JUPYTERHUB_API_TOKEN': '[secret]'" in text, text
    assert "[secret] and 3" in text and "100% of amy" in text, text
    assert "amy has [secret]" in text, text
    assert "short" in text  # under 8 characters: not worth hiding every such word
    assert all(r.filename.endswith("test_units.py") for r in caplog.records)  # the caller's line


@pytest.mark.parametrize(
    "trait, value",
    [
        ("poll_concurrency", 0),
        ("db_timeout", 0),
        ("poll_interval", -1),
        ("poll_timeout", 0),
        ("max_events_per_server", 0),  # trimmed the terminal event: Events never ended
        ("max_struct_depth", 0),
        ("max_message_bytes", 100),
        ("shutdown_grace", -1),
        ("port", 65536),
        ("max_concurrent_starts_per_hub", -1),
    ],
)
def test_outpost_refuses_settings_that_would_stall_it(trait, value):
    from traitlets import TraitError

    from outpost_server.app import Outpost

    with pytest.raises(TraitError, match=trait):
        Outpost(**{trait: value})
