"""Bearer tokens (c.Outpost.hub_tokens): hubs without client certificates, for sites without
a PKI. The token names the hub, is stored hashed, compared in constant time, needs TLS off
loopback, and never reaches a log or an error message."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from types import SimpleNamespace

import grpc
import pytest
from traitlets import TraitError

from outpost_client import OutpostClient, ServerNotFound, Unauthenticated, pb
from outpost_client.errors import UNAUTHENTICATED_HUB
from outpost_client.outposts import OutpostConfig
from outpost_client.registry import REGISTRY
from outpost_server import identity
from outpost_server.app import Outpost
from outpost_server.identity import certificate_resolver, hash_token, token_resolver

from .harness.hub import hub_client, make_spawner
from .harness.outpost import one_line, run_outpost

pytestmark = pytest.mark.rpc

TOKEN_A = secrets.token_urlsafe(32)
TOKEN_B = secrets.token_urlsafe(32)
WRONG = secrets.token_urlsafe(32)
HUB_TOKENS = {"hub-a": hash_token(TOKEN_A), "hub-b": hash_token(TOKEN_B)}


def server_tls(pki, **traits) -> dict:
    """TLS without client certificates: only valid together with hub_tokens."""
    return dict(tls_cert=pki.server.cert, tls_key=pki.server.key, **traits)


# --- over TLS, two hubs ---------------------------------------------------------------------


async def test_two_hubs_by_token_over_tls_are_isolated(start_outpost, pki, capfd):
    async with start_outpost(**server_tls(pki, hub_tokens=HUB_TOKENS)) as op:
        a, b = hub_client(op.address, pki, token=TOKEN_A), hub_client(op.address, pki, token=TOKEN_B)
        async with a, b:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
            assert [s.server_name for s in await a.list_servers()] == ["alice"]
            assert (await a.poll("alice")).state == pb.SERVER_STATE_RUNNING
            # hub B: exactly the answers for a server that does not exist
            assert await b.list_servers() == []
            with pytest.raises(ServerNotFound):
                await b.poll("alice")
            assert (await b.stop("alice")).outcome == pb.STOP_OUTCOME_NOT_FOUND
            with pytest.raises(ServerNotFound):
                async for _ in b.events("alice"):
                    pass
            # B's server of the same name is its own
            await b.start("alice", "s2", user_name="alice", wait_until_ready=True)
            assert (await a.poll("alice")).start_id == "s1"
        assert set(op.manager.records) == {("hub-a", "alice"), ("hub-b", "alice")}
    # the Outpost application's own log (it does not propagate) goes to stderr
    assert "(TLS, bearer tokens of 2 hubs)" in capfd.readouterr().err


@pytest.mark.parametrize("case", ["no token", "wrong token", "other scheme", "two headers"])
async def test_missing_or_wrong_token_is_unauthenticated_and_starts_nothing(start_outpost, pki, case):
    async with start_outpost(**server_tls(pki, hub_tokens=HUB_TOKENS)) as op:
        if case in ("no token", "wrong token"):
            async with hub_client(op.address, pki, token=None if case == "no token" else WRONG) as client:
                with pytest.raises(Unauthenticated) as info:
                    await client.start("alice", "s1", user_name="alice", wait_until_ready=True)
                assert info.value.reason == UNAUTHENTICATED_HUB
                with pytest.raises(Unauthenticated):
                    async for _ in client.events("alice"):
                        pass
            message = str(info.value)
            assert WRONG not in message and TOKEN_A not in message
            expected = "needs a bearer token" if case == "no token" else "bearer token is not valid"
            assert expected in message
        else:
            metadata = {
                "other scheme": (("authorization", f"Basic {TOKEN_A}"),),
                "two headers": (("authorization", f"Bearer {TOKEN_A}"), ("authorization", f"Bearer {TOKEN_B}")),
            }[case]
            async with hub_client(op.address, pki) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.stub.Start(
                        pb.StartRequest(server_name="alice", start_id="s1", user=pb.User(name="alice")),
                        metadata=metadata,
                        timeout=5,
                    )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN_A not in info.value.details() and TOKEN_B not in info.value.details()
        assert op.manager.records == {}
        rows, _ = await op.app.store.load()
        assert rows == []


async def test_mtls_and_token_must_name_the_same_hub(start_outpost, pki, capfd):
    traits = dict(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert, hub_tokens=HUB_TOKENS)
    async with start_outpost(**traits) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"], token=TOKEN_A) as both:
            await both.start("alice", "s1", user_name="alice", wait_until_ready=True)
        async with hub_client(op.address, pki, pki.hubs["hub-a"], token=TOKEN_B) as mixed:
            with pytest.raises(Unauthenticated, match="certificate names hub 'hub-a', the bearer token another"):
                await mixed.list_servers()
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as cert_only:
            with pytest.raises(Unauthenticated, match="needs a bearer token"):
                await cert_only.list_servers()
        assert set(op.manager.records) == {("hub-a", "alice")}
    assert "(mTLS, bearer tokens of 2 hubs and identity from CN)" in capfd.readouterr().err


# --- the resolver -----------------------------------------------------------------------------


def context(*metadata, **auth):
    return SimpleNamespace(
        invocation_metadata=lambda: tuple(metadata),
        auth_context=lambda: {k: [v.encode() for v in vs] for k, vs in auth.items()},
    )


def test_token_resolver_compares_every_hash_in_constant_time(monkeypatch):
    calls = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(identity.hmac, "compare_digest", spy)
    hub_tokens = {f"hub-{i}": hash_token(secrets.token_urlsafe(32)) for i in range(5)}
    hub_tokens["hub-a"] = hash_token(TOKEN_A)
    resolve = token_resolver(hub_tokens)
    assert resolve(context(("authorization", f"Bearer {TOKEN_A}"))) == "hub-a"
    # every configured hash was compared, with no early exit, and only as SHA-256 digests
    assert len(calls) == len(hub_tokens)
    digest = hashlib.sha256(TOKEN_A.encode()).digest()
    assert all(a == digest and len(b) == 32 for a, b in calls)
    calls.clear()
    with pytest.raises(Unauthenticated) as info:
        resolve(context(("authorization", f"bearer {WRONG}")))
    assert len(calls) == len(hub_tokens) and WRONG not in str(info.value)
    with pytest.raises(Unauthenticated, match="needs a bearer token"):
        resolve(context(("other", "x")))
    with pytest.raises(Unauthenticated, match="must be 'Bearer <token>'"):
        resolve(context(("authorization", "Bearer ")))


def test_token_resolver_with_a_certificate():
    resolve = token_resolver(HUB_TOKENS, certificate_resolver())
    bearer_a = ("authorization", f"Bearer {TOKEN_A}")
    assert resolve(context(bearer_a, x509_common_name=["hub-a"])) == "hub-a"
    with pytest.raises(Unauthenticated, match="names hub 'hub-b'"):
        resolve(context(bearer_a, x509_common_name=["hub-b"]))


# --- plaintext: loopback only -------------------------------------------------------------------


async def test_plaintext_tokens_on_loopback(start_outpost):
    # tokens authenticate: no opt-in to credential-less plaintext needed
    async with start_outpost(hub_tokens=HUB_TOKENS, default_hub="default", allow_unauthenticated=False) as op:
        async with hub_client(op.address, token=TOKEN_A) as a:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
        # default_hub is not an identity any more: op.client sends no token
        with pytest.raises(Unauthenticated):
            await op.client.list_servers()
        assert set(op.manager.records) == {("hub-a", "alice")}


def test_credentialless_loopback_refuses_to_start_without_the_opt_in(tmp_path):
    """Plaintext without hub_tokens makes every local user (and every notebook a
    LocalProcessSpawner runs on the host) the default hub: one line naming the fixes,
    nothing started, no database made."""
    out = run_outpost("--port", "0", cwd=tmp_path)
    line = one_line(out)
    assert line.startswith("jupyterhub-outpost: refusing to serve gRPC without credentials on 127.0.0.1")
    assert "every local user" in line and "--allow-unauthenticated" in line and "hub_tokens" in line
    assert "tls_client_ca" in line
    assert not (tmp_path / "outpost.sqlite").exists()
    # off loopback allow_plaintext alone is not the opt-in either
    out = run_outpost("--ip", "0.0.0.0", "--allow-plaintext", "--port", "0", cwd=tmp_path)
    assert "refusing to serve gRPC without credentials on 0.0.0.0" in one_line(out)


async def test_credentialless_loopback_needs_the_explicit_opt_in_in_process_too(start_outpost):
    with pytest.raises(identity.AuthConfigError, match="without credentials on 127.0.0.1"):
        async with start_outpost(allow_unauthenticated=False):
            pass
    async with start_outpost(allow_unauthenticated=True, default_hub="laptop") as op:
        await op.client.start("alice", "s1", user_name="alice", wait_until_ready=True)
        assert set(op.manager.records) == {("laptop", "alice")}


def test_plaintext_tokens_off_loopback_refused_or_warned(caplog):
    with pytest.raises(SystemExit, match="refusing to serve plaintext"):
        Outpost(ip="0.0.0.0", hub_tokens=HUB_TOKENS).check_network()
    app = Outpost(ip="0.0.0.0", hub_tokens=HUB_TOKENS, allow_plaintext=True)
    app.log = logging.getLogger("test_tokens.app")
    with caplog.at_level(logging.WARNING, "test_tokens.app"):
        app.check_network()
    assert "the tokens travel unencrypted" in caplog.text
    Outpost(ip="127.0.0.1", hub_tokens=HUB_TOKENS).check_network()


def test_tls_without_client_ca_is_valid_with_tokens_only(pki):
    app = Outpost(ip="0.0.0.0", **server_tls(pki, hub_tokens=HUB_TOKENS))
    app.check_tls()
    app.check_network()
    with pytest.raises(SystemExit, match=r"tls_client_ca not set \(TLS without client certificates needs hub_tokens\)"):
        Outpost(ip="0.0.0.0", **server_tls(pki)).check_tls()
    with pytest.raises(SystemExit, match=r"TLS needs tls_cert and tls_key \(and tls_client_ca for mTLS\); tls_key not set"):
        Outpost(tls_cert=pki.server.cert, hub_tokens=HUB_TOKENS).check_tls()


def test_hub_tokens_are_hashes_and_never_echoed():
    assert Outpost(hub_tokens={"a": HUB_TOKENS["hub-a"].upper().replace("SHA256", "sha256")}).hub_tokens == {
        "a": HUB_TOKENS["hub-a"]
    }
    with pytest.raises(TraitError, match=r"hub_tokens\['a'\] is not a token hash") as info:
        Outpost(hub_tokens={"a": TOKEN_A})  # the raw token pasted by mistake
    assert TOKEN_A not in str(info.value)
    with pytest.raises(TraitError, match="'a' and 'b' have the same token"):
        Outpost(hub_tokens={"a": HUB_TOKENS["hub-a"], "b": HUB_TOKENS["hub-a"]})


def test_hash_token_command(tmp_path):
    out = run_outpost("hash-token", input=TOKEN_A + "\n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hash_token(TOKEN_A) == "sha256:" + hashlib.sha256(TOKEN_A.encode()).hexdigest()
    short = run_outpost("hash-token", input="short\n", cwd=tmp_path)
    assert short.returncode == 1 and "at least 32 characters" in short.stderr


# --- the hub side -------------------------------------------------------------------------------


async def test_the_spawner_sends_its_token(start_outpost, pki):
    async with start_outpost(**server_tls(pki, hub_tokens=HUB_TOKENS)) as op:
        spawner = make_spawner(op, outpost_ca=pki.ca.cert, outpost_token=TOKEN_B)
        assert TOKEN_B not in repr(spawner.outpost)
        await spawner.start()
        assert await spawner.poll() is None
        assert set(op.manager.records) == {("hub-b", "alice")}
        await spawner.stop()
    # an `outposts` entry takes the same token
    config = OutpostConfig.from_dict("site", {"address": "127.0.0.1:1", "ca": pki.ca.cert, "token": TOKEN_A})
    assert config.token == TOKEN_A and TOKEN_A not in repr(config)
    other = OutpostConfig("127.0.0.1:1", ca=pki.ca.cert, token=TOKEN_B)
    assert REGISTRY.get(config).client(5) is not REGISTRY.get(other).client(5)


def test_client_refuses_a_token_it_cannot_send():
    with pytest.raises(ValueError, match="token") as info:
        OutpostClient("127.0.0.1:1", token="has space")
    assert "has space" not in str(info.value)


async def test_token_never_appears_in_the_log(start_outpost, pki, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="outpost")
    async with start_outpost(**server_tls(pki, hub_tokens=HUB_TOKENS)) as op:
        a, bad = hub_client(op.address, pki, token=TOKEN_A), hub_client(op.address, pki, token=WRONG)
        async with a, bad:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
            await a.list_servers()
            with pytest.raises(Unauthenticated):
                await bad.list_servers()
            await a.stop("alice")
    captured = capfd.readouterr()
    text = caplog.text + captured.out + captured.err  # the application's log goes to stderr
    assert "serving" in text
    assert "ListServers UNAUTHENTICATED" in text and "Start OK" in text  # the access log ran
    for secret in (TOKEN_A, WRONG):
        assert secret not in text


@pytest.mark.parametrize("address", ["10.0.0.5:50051", "outpost.example.org:50051", "[2001:db8::1]:50051"])
def test_the_hub_never_sends_a_token_in_clear_off_this_host(address):
    from outpost_client import OutpostClient

    with pytest.raises(ValueError, match="use TLS") as err:
        OutpostClient(address, token=TOKEN_A)
    assert TOKEN_A not in str(err.value)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/run/outpost.sock"])
async def test_a_token_in_clear_is_fine_on_this_host(address):
    from outpost_client import OutpostClient

    await OutpostClient(address, token=TOKEN_A).close()


def test_a_token_with_tls_goes_anywhere(pki):
    from outpost_client import OutpostClient, TLSConfig

    OutpostClient("outpost.example.org:50051", tls=TLSConfig(ca=pki.ca.cert), token=TOKEN_A)
