"""mTLS: the handshake refuses bad client certificates, the certificate names the hub,
and `jupyterhub-outpost generate-certs` makes files a real Outpost and real hubs can use."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import shutil
import stat
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outpost_client import ServerNotFound, Unauthenticated, Unavailable, pb
from outpost_client.errors import UNAUTHENTICATED_HUB
from outpost_server.app import Outpost
from outpost_server.certs import CertsError, Pair, generate_certs
from outpost_server.identity import certificate_resolver
from outpost_server.tls import TLSConfigError, load_server_tls

from .harness.hub import hub_client
from .harness.outpost import grpcurl, run_outpost

pytestmark = pytest.mark.rpc

SERVICE = "jupyterhub.outpost.v1.OutpostService"


# --- certificates ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory):
    """Another CA the Outpost does not trust, with a hub-a of its own."""
    return generate_certs(str(tmp_path_factory.mktemp("other") / "certs"), ["127.0.0.1"], ["hub-a"])


def issue(pki, directory: Path, cn: str, *, sans=(), valid_from=-1, valid_days=30) -> Pair:
    """A client certificate signed by pki's CA, with chosen names and validity (days from now)."""
    ca_cert = x509.load_pem_x509_certificate(Path(pki.ca.cert).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(pki.ca.key).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_from))
        .not_valid_after(now + datetime.timedelta(days=valid_from + valid_days))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    name = uuid.uuid4().hex[:8]
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Pair(str(cert_path), str(key_path))


def tls_traits(pki, **traits) -> dict:
    return dict(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert, **traits)


# --- in process -----------------------------------------------------------------------------


async def test_certificate_cn_names_the_hub_and_keeps_hubs_apart(start_outpost, pki):
    async with start_outpost(**tls_traits(pki)) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as a, hub_client(
            op.address, pki, pki.hubs["hub-b"]
        ) as b:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
            assert [s.server_name for s in await a.list_servers()] == ["alice"]
            assert (await a.poll("alice")).state == pb.SERVER_STATE_RUNNING
            assert await b.list_servers() == []
            with pytest.raises(ServerNotFound):
                await b.poll("alice")
        # a plaintext client cannot talk to a TLS port
        with pytest.raises(Unavailable):
            await op.client.list_servers(timeout=5)


@pytest.mark.parametrize("case", ["no certificate", "unknown CA", "expired", "not yet valid"])
async def test_handshake_refuses_bad_client_certificates(start_outpost, pki, other_pki, tmp_path, case):
    pair = {
        "no certificate": None,
        "unknown CA": other_pki.hubs["hub-a"],
        "expired": issue(pki, tmp_path, "hub-a", valid_from=-30, valid_days=29),
        "not yet valid": issue(pki, tmp_path, "hub-a", valid_from=1),
    }[case]
    async with start_outpost(**tls_traits(pki)) as op:
        async with hub_client(op.address, pki, pair) as client:
            with pytest.raises(Unavailable) as info:
                await client.list_servers()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_allowed_hubs_and_identity_map(start_outpost, pki):
    traits = tls_traits(pki, hub_identity_map={"hub-a": "main"}, allowed_hubs=["main"])
    async with start_outpost(**traits) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as a:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
        async with hub_client(op.address, pki, pki.hubs["hub-b"]) as b:
            with pytest.raises(Unauthenticated) as info:
                await b.list_servers()
        assert info.value.reason == UNAUTHENTICATED_HUB
        assert "'hub-b' is not allowed on this Outpost" in str(info.value)
        # servers are keyed by the mapped name
        assert [s.server_name for s in op.manager.list("main", 100, "")[0]] == ["alice"]


async def test_identity_from_first_dns_san(start_outpost, pki, tmp_path):
    sans = [x509.IPAddress(ipaddress.ip_address("10.0.0.1")), x509.DNSName("hub-x.example.org")]
    with_san = issue(pki, tmp_path, "not-the-hub", sans=sans)
    without = issue(pki, tmp_path, "hub-x.example.org")
    traits = tls_traits(pki, hub_identity_from="san", allowed_hubs=["hub-x.example.org"])
    async with start_outpost(**traits) as op:
        async with hub_client(op.address, pki, with_san) as client:
            assert await client.list_servers() == []
        async with hub_client(op.address, pki, without) as client:
            with pytest.raises(Unauthenticated, match="no DNS subjectAltName"):
                await client.list_servers()


def fake_context(**auth):
    return SimpleNamespace(auth_context=lambda: {k: [v.encode() for v in vs] for k, vs in auth.items()})


def test_certificate_resolver():
    ctx = fake_context(
        x509_common_name=["cn-hub"],
        x509_subject_alternative_name=["10.0.0.1", "dns-hub"],
        peer_dns=["dns-hub", "second"],
    )
    assert certificate_resolver()(ctx) == "cn-hub"
    assert certificate_resolver("san")(ctx) == "dns-hub"
    assert certificate_resolver("cn", {"cn-hub": "main"})(ctx) == "main"
    assert certificate_resolver("cn", {"cn-hub": "main"}, ["main"])(ctx) == "main"
    with pytest.raises(Unauthenticated, match=r"Hub 'main' \(certificate 'cn-hub'\) is not allowed"):
        certificate_resolver("cn", {"cn-hub": "main"}, ["other"])(ctx)
    with pytest.raises(Unauthenticated, match="no common name"):
        certificate_resolver()(fake_context())


def test_tls_files_are_checked(pki, tmp_path):
    tls = load_server_tls(pki.server.cert, pki.server.key, pki.ca.cert)
    assert tls.warnings == ()
    with pytest.raises(TLSConfigError, match="cannot read the TLS key /nonexistent"):
        load_server_tls(pki.server.cert, "/nonexistent", pki.ca.cert)
    with pytest.raises(TLSConfigError, match="is not the key of the certificate"):
        load_server_tls(pki.server.cert, pki.hubs["hub-a"].key, pki.ca.cert)
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        load_server_tls(pki.server.cert, pki.server.key, pki.server.key)
    loose = tmp_path / "loose.key"
    shutil.copy(pki.server.key, loose)
    loose.chmod(0o644)
    (warning,) = load_server_tls(pki.server.cert, str(loose), pki.ca.cert).warnings
    assert "readable by group or others (mode 0644)" in warning


def test_tls_lifts_the_loopback_rule(pki):
    Outpost(ip="0.0.0.0", **tls_traits(pki)).check_network()
    with pytest.raises(SystemExit, match="refusing to serve plaintext"):
        Outpost(ip="0.0.0.0").check_network()


def test_tls_needs_all_three_files(tmp_path, pki):
    out = run_outpost("--tls-cert", pki.server.cert, "--port", "0", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == "jupyterhub-outpost: mTLS needs tls_cert, tls_key and tls_client_ca; tls_key, tls_client_ca not set"


def test_generate_certs_refuses_bad_input(tmp_path):
    with pytest.raises(CertsError, match="--hub 'a/b'"):
        generate_certs(str(tmp_path / "x"), ["h"], ["a/b"])
    with pytest.raises(CertsError, match="at least one --host"):
        generate_certs(str(tmp_path / "x"), [], ["a"])
    generate_certs(str(tmp_path / "y"), ["h"], ["a"])
    with pytest.raises(CertsError, match="already holds certificates"):
        generate_certs(str(tmp_path / "y"), ["h"], ["b"])


# --- a real process, with files from the real command -----------------------------------------


@pytest.mark.slow
async def test_generate_certs_then_a_real_outpost(outpost_process, tmp_path):
    certs = tmp_path / "certs"
    args = ["--out", str(certs), "--host", "127.0.0.1", "--host", "outpost.example.org", "--hub", "A", "--hub", "B"]
    made = run_outpost("generate-certs", *args, timeout=60)
    assert made.returncode == 0, made.stderr
    ca = certs / "outpost-ca/outpost-ca.crt"
    server_cert = certs / "outpost-server/outpost-server.crt"
    server_key = certs / "outpost-server/outpost-server.key"
    for hub in "AB":
        assert f"c.OutpostSpawner.outpost_cert = '{certs}/{hub}/{hub}.crt'" in made.stdout
        assert f"c.OutpostSpawner.outpost_key = '{certs}/{hub}/{hub}.key'" in made.stdout
    assert f"c.Outpost.tls_client_ca = '{ca}'" in made.stdout
    assert "c.Outpost.allowed_hubs = ['A', 'B']" in made.stdout
    assert 'c.Outpost.user_mapping = "{hub}-{name}"' in made.stdout  # two hubs: the site chooses
    for key in certs.glob("*/*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert len(list(certs.glob("*/*.key"))) == 4
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["outpost.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    # two hubs (A and B): the site chooses their users' accounts (tests/test_accounts.py)
    op = outpost_process(
        'c.Outpost.spawner_class = "outpost_server.testing.InstantSpawner"\n'
        'c.Outpost.user_mapping = "{hub}-{name}"\n'
    )
    server_key.chmod(0o640)  # the Outpost warns about it, and still serves
    op.start("--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-client-ca", str(ca))
    await op.wait_log("serving")
    log = op.log.read_text()
    assert "(mTLS, identity from CN)" in log
    assert f"TLS key {server_key} is readable by group or others (mode 0640)" in log

    def client(hub):
        pair = Pair(str(certs / hub / f"{hub}.crt"), str(certs / hub / f"{hub}.key"))
        return hub_client(op.address, pair=pair, ca=str(ca), timeout=10)

    async with client("A") as a, client("B") as b:
        assert await a.list_servers() == []
        await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
        assert [s.server_name for s in await a.list_servers()] == ["alice"]
        assert await b.list_servers() == []
        with pytest.raises(ServerNotFound):
            await b.poll("alice")

    # grpcurl over mTLS, as an operator would
    auth = ["-cacert", str(ca), "-cert", str(certs / "A/A.crt"), "-key", str(certs / "A/A.key")]
    auth += ["-servername", "outpost.example.org"]
    listed = await asyncio.to_thread(grpcurl, *auth, op.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split()
    polled = await asyncio.to_thread(grpcurl, *auth, "-d", '{"server_name": "alice"}', op.address, f"{SERVICE}/Poll")
    assert polled.returncode == 0, polled.stderr
    assert json.loads(polled.stdout)["status"]["state"] == "SERVER_STATE_RUNNING"
    # without a client certificate the handshake fails
    refused = await asyncio.to_thread(grpcurl, "-cacert", str(ca), op.address, "list")
    assert refused.returncode != 0


async def test_batch_poll_sees_only_own_servers(start_outpost, pki):
    """BatchPoll answers like Poll: another hub's server is 'not found'."""
    async with start_outpost(**tls_traits(pki)) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as a, hub_client(
            op.address, pki, pki.hubs["hub-b"]
        ) as b:
            await a.start("alice", "s1", user_name="alice", wait_until_ready=True)
            statuses, not_found = await b.batch_poll(["alice"])
            assert statuses == [] and not_found == ["alice"]
            statuses, not_found = await a.batch_poll(["alice"])
            assert [s.server_name for s in statuses] == ["alice"] and not_found == []


def test_generate_certs_keys_are_private_from_the_first_byte(tmp_path, monkeypatch):
    """certipy writes a key, then chmods it: under the usual umask (022) the key would be
    world-readable in between. With the chmod taken away, every key is still 0600: it
    was created so."""
    import os

    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    old = os.umask(0o022)
    try:
        made = generate_certs(str(tmp_path / "certs"), ["127.0.0.1"], ["hub-a"])
        assert os.umask(0o022) == 0o022  # and the process's umask is back as it was
    finally:
        os.umask(old)
    keys = [made.ca.key, made.server.key, made.hubs["hub-a"].key]
    for key in keys:
        mode = stat.S_IMODE(Path(key).stat().st_mode)
        assert mode & 0o077 == 0, (key, oct(mode))
