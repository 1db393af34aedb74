"""The hub API relay (outpost_server/relay.py): batchspawner's port callback answered at
the site, everything else with a token passed on to the hub's upstream, which the site
chooses (never the hub).

A real Outpost in this process with the relay on, hosting ``LatePortSpawner`` (its
start() waits for its port like batchspawner's does); a real HTTP server stands in for
the hub API (what the relay talks to) and records what reaches it; another stands in
for an address a hostile hub names (a metadata service) and must see nothing; the tests
play the notebook. Connection and request caps: tests/test_relay_limits.py. The real
chain (JupyterHub, reverse forward, Slurm, batchspawner-singleuser) is
tests/test_e2e_slurm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from dataclasses import dataclass, field

import asyncssh
import pytest
from tornado import httputil, netutil, web
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from traitlets import TraitError
from traitlets.config import Config

from outpost_client import OutpostClient, pb
from outpost_server.identity import hash_token
from outpost_server.relay import (
    HubAPIRelay,
    RelayConfigError,
    api_path_of,
    relay_prefix,
    relayed_env,
    reverse_forward_url,
    token_from,
)

from .harness.util import free_port, wait_for

pytestmark = pytest.mark.rpc

LATE = "outpost_server.testing.LatePortSpawner"
RELAY = {"HubAPIRelay.enabled": True, "HubAPIRelay.port": 0}
HUB_A_TOKEN = "hub-a-grpc-token-0123456789abcdefghijklmnop"
HUB_B_TOKEN = "hub-b-grpc-token-0123456789abcdefghijklmnop"


# --- a stand-in for the hub API, recording what reaches it ----------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: httputil.HTTPHeaders
    body: bytes


@dataclass
class Upstream:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    # requests to .../hold wait for this
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_url(self) -> str:
        return f"{self.origin}/hub/api"


class UpstreamHandler(web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, upstream: Upstream):
        self.upstream = upstream

    def check_xsrf_cookie(self):
        pass

    async def _any(self):
        r = self.request
        self.upstream.seen.append(Seen(r.method, r.path, r.query, r.headers, r.body))
        if r.path.endswith("/slow"):
            await asyncio.sleep(3)
        if r.path.endswith("/hold"):
            await self.upstream.release.wait()
        self.set_status(int(self.get_query_argument("status", "200")))
        self.set_header("X-Upstream", "hub")
        self.add_header("Set-Cookie", "a=1; Path=/")
        self.add_header("Set-Cookie", "b=2; Path=/")
        self.set_header("Content-Type", "application/json")
        if r.path.endswith("/big"):
            self.finish(b"x" * 20000)
            return
        self.finish(json.dumps({"path": r.path, "length": len(r.body)}))

    get = head = post = put = patch = delete = options = _any


async def serve_upstream():
    """An HTTP server recording every request (an async generator: start, then stop)."""
    state = Upstream()
    # no access log of its own: the tests look for tokens in what the Outpost logs
    app = web.Application([(r"/.*", UpstreamHandler, {"upstream": state})], log_function=lambda handler: None)
    server = HTTPServer(app)
    sockets = netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    state.port = sockets[0].getsockname()[1]
    yield state
    state.release.set()
    server.stop()
    await server.close_all_connections()


@pytest.fixture
async def upstream():
    """The hub API, as the site routes to it."""
    async for state in serve_upstream():
        yield state


@pytest.fixture
async def metadata():
    """What a hostile hub names as its API: must never be contacted."""
    async for state in serve_upstream():
        yield state


def routed(upstream: Upstream, *hubs: str, **traits) -> dict:
    """RELAY with ``hubs`` (default: "default") routed to upstream, plus ``traits``."""
    urls = {hub: upstream.origin for hub in hubs or ("default",)}
    return {**RELAY, "HubAPIRelay.hub_urls": urls, **traits}


@pytest.fixture
async def http():
    client = SimpleAsyncHTTPClient(force_instance=True)
    yield client
    client.close()


async def call(http, url, method="GET", *, token=None, scheme="token", body=None, headers=None):
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    request = HTTPRequest(
        url, method=method, headers=headers, body=body, allow_nonstandard_methods=True, request_timeout=20
    )
    return await http.fetch(request, raise_error=False)


def notebook_env(upstream: Upstream, user: str) -> dict[str, str]:
    api = upstream.api_url()
    return {
        "JUPYTERHUB_API_TOKEN": f"notebook-token-of-{user}-{uuid.uuid4().hex}",
        "JUPYTERHUB_API_URL": api,
        "JUPYTERHUB_ACTIVITY_URL": f"{api}/users/{user}/activity",
        "JUPYTERHUB_SERVICE_PREFIX": f"/user/{user}/",
        "JUPYTERHUB_BASE_URL": "/",
    }


async def start_server(client: OutpostClient, op, hub: str, name: str, env: dict) -> tuple:
    """Start ``name``; return (its record, the env its notebook gets)."""
    await client.start(name, uuid.uuid4().hex, user_name=name, env=env)
    rec = op.manager.records[(hub, name)]
    await wait_for(lambda: rec.spawner is not None, message="no Spawner")
    return rec, rec.spawner.get_env()


async def ready_event(client: OutpostClient, name: str) -> pb.Event:
    async def follow():
        last = None
        async for event in client.events(name):
            last = event
        return last

    return await asyncio.wait_for(follow(), 10)


# --- the callback -------------------------------------------------------------------------


async def test_callback_sets_port_and_start_completes(start_outpost, upstream, http, caplog):
    caplog.set_level(logging.DEBUG)
    async with start_outpost(LATE, **RELAY) as op:
        relay = op.app.relay
        env = notebook_env(upstream, "alice")
        rec, nb_env = await start_server(op.client, op, "default", "alice", env)
        prefix = f"{relay.base_url}/hubs/default/servers/alice"
        assert relay.base_url == f"http://127.0.0.1:{relay.bound_port}"
        assert nb_env["JUPYTERHUB_API_URL"] == f"{prefix}/hub/api"
        assert nb_env["JUPYTERHUB_ACTIVITY_URL"] == f"{prefix}/hub/api/users/alice/activity"
        assert nb_env["JUPYTERHUB_API_TOKEN"] == env["JUPYTERHUB_API_TOKEN"]
        callback = nb_env["JUPYTERHUB_API_URL"] + "/batchspawner"  # what batchspawner-singleuser posts to

        # not JSON, not an object, a bad port: 400, nothing set
        token = env["JUPYTERHUB_API_TOKEN"]
        for body, status in (
            (b"{port: 1", 400),
            (b"[1]", 400),
            ({"port": "80"}, 400),
            ({"port": 70000}, 400),
        ):
            r = await call(http, callback, "POST", token=token, body=body)
            assert r.code == status, (body, r.code, r.body)
        assert rec.spawner.port == 0 and rec.state == pb.SERVER_STATE_STARTING

        # the right token, as batchspawner-singleuser sends it; unknown keys are not set
        r = await call(http, callback, "POST", token=token, body={"port": 4242, "ip": "10.9.9.9"})
        assert r.code == 200, r.body
        assert json.loads(r.body) == {"message": "BatchSpawner data configured"}
        event = await ready_event(op.client, "alice")
        assert event.kind == pb.EVENT_KIND_READY
        assert (event.address.host, event.address.port) == ("127.0.0.1", 4242)
        assert (await op.client.poll("alice")).address.port == 4242
        assert rec.spawner is None or rec.spawner.ip != "10.9.9.9"

        # once running, the port is not the notebook's to change any more
        r = await call(http, callback, "POST", token=token, scheme="Bearer", body={"port": 5000})
        assert r.code == 409
        assert (await op.client.poll("alice")).address.port == 4242
    assert not upstream.seen, "the callback is answered at the site, never passed on"
    assert token not in caplog.text


async def test_wrong_token_refused_nothing_set(start_outpost, upstream, http, caplog):
    async with start_outpost(LATE, **RELAY) as op:
        rec, nb_env = await start_server(op.client, op, "default", "bob", notebook_env(upstream, "bob"))
        callback = nb_env["JUPYTERHUB_API_URL"] + "/batchspawner"
        for headers in (
            {"Authorization": "token not-the-token"},
            {"Authorization": "Bearer not-the-token"},
            {"Authorization": "Basic Ym9iOnB3"},
            {},
        ):
            r = await call(http, callback, "POST", body={"port": 4243}, headers=headers)
            assert r.code == 403, (headers, r.code)
        assert rec.spawner.port == 0 and rec.state == pb.SERVER_STATE_STARTING
        # a server that does not exist, and a path outside the relay's scheme
        base = op.app.relay.base_url
        r = await call(http, f"{base}/hubs/default/servers/nobody/hub/api/batchspawner", "POST",
                       token=nb_env["JUPYTERHUB_API_TOKEN"], body={"port": 4243})  # fmt: skip
        assert r.code == 404
        r = await call(http, f"{base}/hub/api/batchspawner", "POST", body={"port": 4243})
        assert r.code == 404
        assert rec.spawner.port == 0
        await op.client.stop("bob")
    assert not upstream.seen
    assert "not-the-token" not in caplog.text


async def test_another_hubs_token_cannot_set_this_hubs_port(start_outpost, upstream, http):
    """Two hubs with a server of the same name: only each server's own token sets its port."""
    tokens = {"hub-a": hash_token(HUB_A_TOKEN), "hub-b": hash_token(HUB_B_TOKEN)}
    async with start_outpost(LATE, hub_tokens=tokens, **RELAY) as op:
        async with (
            OutpostClient(op.address, token=HUB_A_TOKEN) as a,
            OutpostClient(op.address, token=HUB_B_TOKEN) as b,
        ):
            rec_a, env_a = await start_server(a, op, "hub-a", "carol", notebook_env(upstream, "carol"))
            rec_b, env_b = await start_server(b, op, "hub-b", "carol", notebook_env(upstream, "carol"))
            assert "/hubs/hub-a/servers/carol/" in env_a["JUPYTERHUB_API_URL"]
            assert "/hubs/hub-b/servers/carol/" in env_b["JUPYTERHUB_API_URL"]
            callback_a = env_a["JUPYTERHUB_API_URL"] + "/batchspawner"
            r = await call(http, callback_a, "POST", token=env_b["JUPYTERHUB_API_TOKEN"], body={"port": 4300})
            assert r.code == 403
            assert rec_a.spawner.port == 0 and rec_b.spawner.port == 0

            r = await call(http, env_b["JUPYTERHUB_API_URL"] + "/batchspawner", "POST",
                           token=env_b["JUPYTERHUB_API_TOKEN"], body={"port": 4301})  # fmt: skip
            assert r.code == 200
            assert (await ready_event(b, "carol")).address.port == 4301
            assert rec_a.spawner.port == 0 and rec_a.state == pb.SERVER_STATE_STARTING
            await a.stop("carol")


# --- passing on ---------------------------------------------------------------------------


async def test_other_requests_pass_through(start_outpost, upstream, http, caplog):
    caplog.set_level(logging.DEBUG)
    async with start_outpost(LATE, **routed(upstream)) as op:
        _, nb_env = await start_server(op.client, op, "default", "dave", notebook_env(upstream, "dave"))
        api = nb_env["JUPYTERHUB_API_URL"]

        # a token check: method, path, query, headers (Authorization too) and the answer
        r = await call(http, f"{api}/user?status=418&x=%2Fy", token="a-users-token",
                       headers={"X-Custom": "kept", "Accept": "application/json"})  # fmt: skip
        assert r.code == 418
        assert r.headers["X-Upstream"] == "hub"
        assert r.headers.get_list("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert json.loads(r.body) == {"path": "/hub/api/user", "length": 0}
        seen = upstream.seen[-1]
        assert (seen.method, seen.path, seen.query) == ("GET", "/hub/api/user", "status=418&x=%2Fy")
        assert seen.headers["Authorization"] == "token a-users-token"
        assert seen.headers["X-Custom"] == "kept"
        assert seen.headers["Host"] == f"127.0.0.1:{upstream.port}"

        # activity: a POST with a body, byte for byte
        body = json.dumps({"servers": {"": {"last_activity": "2024-01-01T00:00:00Z"}}}).encode()
        r = await call(http, nb_env["JUPYTERHUB_ACTIVITY_URL"], "POST", token="t", body=body,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.code == 200
        seen = upstream.seen[-1]
        assert (seen.method, seen.path, seen.body) == ("POST", "/hub/api/users/dave/activity", body)

        # OAuth code exchange: a form body, and the notebook's token in Authorization, as
        # jupyterhub's HubOAuth sends it (services/auth.py: _api_request sets it for every
        # call, token_for_code too); other methods
        r = await call(http, f"{api}/oauth2/token", "POST", body=b"code=c&client_id=x", token="nb-token",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert r.code == 200 and upstream.seen[-1].body == b"code=c&client_id=x"
        assert upstream.seen[-1].headers["Authorization"] == "token nb-token"
        for method in ("DELETE", "PATCH", "PUT", "HEAD", "OPTIONS"):
            r = await call(
                http, f"{api}/users/dave", method, token="t", body=b"{}" if method in ("PATCH", "PUT") else None
            )
            assert r.code == 200 and upstream.seen[-1].method == method, method
        # GET .../batchspawner is not the callback: passed on
        r = await call(http, f"{api}/batchspawner", token="t")
        assert r.code == 200 and upstream.seen[-1].path == "/hub/api/batchspawner"

        # only the hub API: nothing else of the hub, no dot segments
        count = len(upstream.seen)
        prefix = api[: -len("/hub/api")]
        for path in (
            "/hub/login",
            "/hub/apix",
            "/hub/api/../login",
            "/hub/api/%2e%2e/login",
            "/hub/api/..%2F..%2Flogin",
            "/hub/api/x%5C..%5C..%5Clogin",
            "/user/dave/",
            "/",
        ):
            r = await call(http, prefix + path, token="t")
            assert r.code in (400, 404), (path, r.code)
        assert len(upstream.seen) == count

        # a token in a query string is passed on, never logged (neither relayed nor refused)
        r = await call(http, f"{api}/user?token=query-token-0123456789")
        assert r.code == 200 and upstream.seen[-1].query == "token=query-token-0123456789"
        r = await call(http, f"{prefix}/hub/login?token=query-token-0123456789")
        assert r.code == 404
        await op.client.stop("dave")
    assert "query-token-0123456789" not in caplog.text
    assert "a-users-token" not in caplog.text


async def test_bounds_and_upstream_failures(start_outpost, upstream, http):
    traits = routed(upstream, **{"HubAPIRelay.max_body_bytes": 8192, "HubAPIRelay.upstream_timeout": 1.0})
    async with start_outpost(LATE, **traits) as op:
        env = notebook_env(upstream, "erin")
        _, nb_env = await start_server(op.client, op, "default", "erin", env)
        api = nb_env["JUPYTERHUB_API_URL"]
        r = await call(http, f"{api}/users/erin/activity", "POST", token="t", body=b"x" * 9000)
        assert r.code == 413
        assert not upstream.seen, "an oversized body never reaches the hub"
        r = await call(http, f"{api}/big", token="t")  # the hub's answer is larger than the bound
        assert r.code == 502
        r = await call(http, f"{api}/slow", token="t")
        assert r.code == 504
        assert json.loads(r.body)["message"] == "the hub did not answer in time"

        # the hub unreachable (its reverse forward down): 502, not a hang
        op.app.relay.hub_urls = {"default": "http://127.0.0.1:9"}
        r = await call(http, f"{api}/user", token="t")
        assert r.code == 502
        assert json.loads(r.body)["message"] == "cannot reach the hub (ConnectionRefusedError)"
        await op.client.stop("erin")


# --- not an open proxy: the site chooses the upstream, only the hub API, only with a token --


async def test_hub_named_address_never_contacted(start_outpost, upstream, metadata, http):
    """A hostile hub names another address (a metadata service) as its API: of its URL only
    the path is used, the request goes to the site's upstream for that hub; and a path of
    "/" opens nothing."""
    async with start_outpost(LATE, **routed(upstream)) as op:
        env = notebook_env(upstream, "mal")
        env["JUPYTERHUB_API_URL"] = f"{metadata.origin}/jh/hub/api"  # a base_url of /jh/
        _, nb_env = await start_server(op.client, op, "default", "mal", env)
        api = nb_env["JUPYTERHUB_API_URL"]
        assert api.endswith("/hubs/default/servers/mal/jh/hub/api")
        r = await call(http, f"{api}/user", token="t")
        assert r.code == 200
        assert upstream.seen[-1].path == "/jh/hub/api/user"
        assert upstream.seen[-1].headers["Host"] == f"127.0.0.1:{upstream.port}"

        # the API URL's path is "/": nothing is relayed for that server, whatever the path
        env = notebook_env(upstream, "slash")
        env["JUPYTERHUB_API_URL"] = f"{metadata.origin}/"
        _, root_env = await start_server(op.client, op, "default", "slash", env)
        prefix = relay_prefix(op.app.relay.base_url, "default", "slash")
        assert root_env["JUPYTERHUB_API_URL"] == prefix
        count = len(upstream.seen)
        for path in ("/latest/meta-data/", "/hub/api/user", "/hub/login", "/"):
            r = await call(http, prefix + path, token="t")
            assert r.code == 404, (path, r.code)
        assert len(upstream.seen) == count
        for name in ("mal", "slash"):
            await op.client.stop(name)
    assert metadata.seen == [], "the address the hub named was contacted"


async def test_hub_without_route_gets_502(start_outpost, metadata, http, caplog):
    """No hub_urls entry and no reverse forward: 502 naming the setting, logged once; the
    address the hub named is never contacted; the callback is still answered."""
    caplog.set_level(logging.INFO, logger="outpost.relay")
    async with start_outpost(LATE, **RELAY) as op:
        rec, nb_env = await start_server(op.client, op, "default", "hana", notebook_env(metadata, "hana"))
        api = nb_env["JUPYTERHUB_API_URL"]
        for _ in range(2):
            r = await call(http, f"{api}/user", token=nb_env["JUPYTERHUB_API_TOKEN"])
            assert r.code == 502
            assert "c.HubAPIRelay.hub_urls" in json.loads(r.body)["message"]
        r = await call(http, f"{api}/batchspawner", "POST", token=nb_env["JUPYTERHUB_API_TOKEN"],
                       body={"port": 4250})  # fmt: skip
        assert r.code == 200
        assert (await ready_event(op.client, "hana")).address.port == 4250
        await op.client.stop("hana")
    assert metadata.seen == []
    assert caplog.text.count("no upstream for hub 'default'") == 1


async def test_request_without_token_not_forwarded(start_outpost, upstream, http):
    async with start_outpost(LATE, **routed(upstream)) as op:
        _, nb_env = await start_server(op.client, op, "default", "ivan", notebook_env(upstream, "ivan"))
        api = nb_env["JUPYTERHUB_API_URL"]
        for url, method, headers in (
            (f"{api}/user", "GET", {}),
            (f"{api}/user", "GET", {"Authorization": "Basic aXZhbjpwdw=="}),
            (f"{api}/user?token=", "GET", {}),
            (f"{api}/users/ivan/activity", "POST", {"Content-Type": "application/json"}),
            (f"{api}/oauth2/token", "POST", {"Content-Type": "application/x-www-form-urlencoded"}),
        ):
            r = await call(http, url, method, headers=headers, body=b"{}" if method == "POST" else None)
            assert r.code == 401, (url, headers, r.code)
            assert "needs a token" in json.loads(r.body)["message"]
        assert upstream.seen == []
        # a token in the query string counts (passed on as it is)
        r = await call(http, f"{api}/user?token=query-token")
        assert r.code == 200 and upstream.seen[-1].query == "token=query-token"
        # but for the API root: jupyterhub-singleuser asks the hub's version there without a
        # token at start (singleuser/extension.py check_hub_version), and exits if it fails
        for url in (api, f"{api}/"):
            r = await call(http, url)
            assert r.code == 200 and upstream.seen[-1].path == url[url.index("/hub/api") :]
        count = len(upstream.seen)
        r = await call(http, api, "POST", body=b"{}")
        assert r.code == 401 and len(upstream.seen) == count
        await op.client.stop("ivan")


async def test_upstream_defaults_to_the_hubs_reverse_forward(start_outpost, upstream, metadata, http, tmp_path):
    # the hub's reverse forward for real: the forwarder holds the listen port, and the
    # hub's SSH connection carries what arrives there to the hub API (upstream)
    listen = free_port()
    key = asyncssh.generate_private_key("ssh-ed25519")
    forwarder = {
        "SSHForwarder.enabled": True,
        "SSHForwarder.port": 0,
        "SSHForwarder.host_key_file": str(tmp_path / "host_key"),
        "SSHForwarder.authorized_keys": {"default": [key.export_public_key().decode()]},
        "SSHForwarder.reverse_listen": {"default": [f"127.0.0.1:{listen}"]},
    }
    async with start_outpost(LATE, **RELAY, **forwarder) as op:
        assert op.app.relay.upstream_for("default") == f"http://127.0.0.1:{listen}"
        async with asyncssh.connect(
            "127.0.0.1", op.app.forwarder.bound_port, username="hub", client_keys=[key],
            known_hosts=None, agent_path=None, config=None,
        ) as hub:  # fmt: skip
            await hub.forward_remote_port("127.0.0.1", listen, "127.0.0.1", upstream.port)
            _, nb_env = await start_server(op.client, op, "default", "judy", notebook_env(metadata, "judy"))
            r = await call(http, nb_env["JUPYTERHUB_API_URL"] + "/user", token="t")
            assert r.code == 200 and upstream.seen[-1].path == "/hub/api/user"
            await op.client.stop("judy")
    assert metadata.seen == []


def test_hub_urls_and_reverse_forward_routes():
    relay = HubAPIRelay(config=Config({"HubAPIRelay": {"hub_urls": {"a": "http://127.0.0.1:18081/"}}}))
    assert relay.hub_urls == {"a": "http://127.0.0.1:18081"}
    for bad in ("http://127.0.0.1:18081/hub/api", "ftp://x:1", "http://u:p@x:1", "http://x:1/?a=1", "x:1"):
        with pytest.raises(TraitError, match="hub_urls"):
            relay.hub_urls = {"a": bad}
    assert reverse_forward_url(["127.0.0.1:18081"]) == "http://127.0.0.1:18081"
    assert reverse_forward_url(["0.0.0.0:18081"]) == "http://127.0.0.1:18081"
    assert reverse_forward_url(["[::]:18081"]) == "http://[::1]:18081"
    assert reverse_forward_url(["[fd00::1]:18081"]) == "http://[fd00::1]:18081"
    assert reverse_forward_url(["127.0.0.1:1", "127.0.0.1:2"]) is None
    assert reverse_forward_url([]) is None
    assert api_path_of("http://x/hub/api/") == "/hub/api"
    assert api_path_of("http://x/jh/hub/api") == "/jh/hub/api"
    for url in ("http://x/", "http://x", "http://x/latest/meta-data", "http://x/a/../hub/api"):
        assert api_path_of(url) is None, url


async def test_relay_off_changes_nothing(start_outpost, upstream):
    async with start_outpost(LATE) as op:
        assert op.app.relay is None
        env = notebook_env(upstream, "gail")
        _, nb_env = await start_server(op.client, op, "default", "gail", env)
        assert nb_env["JUPYTERHUB_API_URL"] == env["JUPYTERHUB_API_URL"]
        assert nb_env["JUPYTERHUB_ACTIVITY_URL"] == env["JUPYTERHUB_ACTIVITY_URL"]
        await op.client.stop("gail")


# --- pure parts -----------------------------------------------------------------------------


def test_relayed_env_and_prefix():
    prefix = relay_prefix("http://login1:8082/", "hub a/b", "x--y")
    assert prefix == "http://login1:8082/hubs/hub%20a%2Fb/servers/x--y"
    env = {
        "JUPYTERHUB_API_URL": "http://127.0.0.1:18081/hub/api",
        "JUPYTERHUB_ACTIVITY_URL": "http://127.0.0.1:18081/hub/api/users/x/activity",
        "JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:0/user/x/",
        "OTHER": "http://127.0.0.1:18081/hub/apix",
    }
    out = relayed_env(env, env["JUPYTERHUB_API_URL"], prefix)
    assert out["JUPYTERHUB_API_URL"] == prefix + "/hub/api"
    assert out["JUPYTERHUB_ACTIVITY_URL"] == prefix + "/hub/api/users/x/activity"
    assert out["JUPYTERHUB_SERVICE_URL"] == env["JUPYTERHUB_SERVICE_URL"]
    assert out["OTHER"] == env["OTHER"]


def test_token_from_headers():
    h = httputil.HTTPHeaders
    assert token_from(h({"Authorization": "token abc"})) == "abc"
    assert token_from(h({"Authorization": "Bearer abc"})) == "abc"
    assert token_from(h({"Authorization": "bearer   abc  "})) == "abc"
    assert token_from(h({"Authorization": "Basic abc"})) == ""
    assert token_from(h({"Authorization": "token a b"})) == ""
    assert token_from(h()) == ""


def test_base_url_from_config(monkeypatch):
    import outpost_server.relay as relay_module

    relay = HubAPIRelay(config=Config({"HubAPIRelay": {"ip": "10.1.2.3", "port": 0}}))
    relay.bound_port = 8099
    assert relay.base_url == "http://10.1.2.3:8099"
    monkeypatch.setattr(relay_module.socket, "getfqdn", lambda: "login1.cluster.example")
    relay.ip = "0.0.0.0"
    assert relay.base_url == "http://login1.cluster.example:8099"
    relay.url = "https://relay.example.org/"
    assert relay.base_url == "https://relay.example.org"
    with pytest.raises(TraitError):
        relay.url = "relay.example.org:8082"
    with pytest.raises(TraitError):
        relay.port = 70000


async def test_relay_lifecycle(start_outpost, http):
    """Started with the Outpost, stopped with it; a busy port is a one-line error."""
    async with start_outpost(LATE, **RELAY) as op:
        port = op.app.relay.bound_port
        r = await call(http, f"http://127.0.0.1:{port}/")
        assert r.code == 404
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        await call(http, f"http://127.0.0.1:{port}/")

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        relay = HubAPIRelay(config=Config({"HubAPIRelay": {"port": busy.getsockname()[1]}}))
        with pytest.raises(RelayConfigError, match="cannot listen on 127.0.0.1"):
            await relay.start(lambda hub, name: None)
        await relay.stop()
    finally:
        busy.close()
