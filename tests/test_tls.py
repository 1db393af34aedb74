"""mTLS: the handshake refuses bad client certificates, the certificate names the hub,
and `jupyterhub-outpost generate-certs` makes files a real Outpost and real hubs can use."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
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
from traitlets import TraitError

from outpost_client import CertificateRevoked, ServerNotFound, Unauthenticated, Unavailable, pb
from outpost_client.errors import CERTIFICATE_REVOKED, UNAUTHENTICATED_HUB
from outpost_server.app import Outpost
from outpost_server.certs import CertsError, Pair, generate_certs
from outpost_server.identity import (
    RevokedCertificates,
    certificate_resolver,
    normalize_fingerprint,
    read_fingerprints,
    revoking,
    show_fingerprint,
)
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


# --- revoking one hub's certificate ----------------------------------------------------------


def fingerprint_of(path: str) -> str:
    """The certificate's SHA-256 fingerprint, computed here without the Outpost's code."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).fingerprint(hashes.SHA256()).hex()


def test_fingerprint_command_prints_what_revoked_certificates_takes(pki, tmp_path):
    out = run_outpost("fingerprint", pki.hubs["hub-a"].cert, pki.hubs["hub-b"].cert, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    printed, comment = lines[0].split("  # ", 1)
    assert printed.startswith("SHA256:") and printed.count(":") == 32  # openssl's spelling
    assert normalize_fingerprint(printed) == fingerprint_of(pki.hubs["hub-a"].cert)
    assert pki.hubs["hub-a"].cert in comment and "CN=hub-a" in comment and "expires" in comment
    # a line of its output is a line of revoked_certificates_file as it is
    listing = tmp_path / "revoked"
    listing.write_text(out.stdout)
    assert read_fingerprints(str(listing)) == {fingerprint_of(pki.hubs[h].cert) for h in ("hub-a", "hub-b")}
    missing = run_outpost("fingerprint", str(tmp_path / "nope.crt"), cwd=tmp_path)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_fingerprints_are_accepted_as_openssl_and_people_write_them():
    digits = "ab" * 32
    for spelling in (
        digits,
        digits.upper(),
        "SHA256:" + ":".join(["AB"] * 32),
        "sha256 Fingerprint=" + ":".join(["AB"] * 32),  # openssl x509 -noout -fingerprint -sha256
        "  sha256:" + digits + "  ",
    ):
        assert normalize_fingerprint(spelling) == digits, spelling
    for wrong in ("", "ab" * 31, "SHA1:" + "ab" * 32, "md5 Fingerprint=" + "ab" * 32, "zz" * 32):
        with pytest.raises(ValueError, match="is not a SHA-256 certificate fingerprint"):
            normalize_fingerprint(wrong)
    with pytest.raises(TraitError, match="revoked_certificates: 'nope' is not a SHA-256"):
        Outpost(revoked_certificates=["nope"])
    assert Outpost(revoked_certificates=["SHA256:" + ":".join(["AB"] * 32)]).revoked_certificates == [digits]


async def test_a_revoked_hub_certificate_is_refused_and_other_hubs_are_served(start_outpost, pki, tmp_path, caplog):
    revoked = fingerprint_of(pki.hubs["hub-a"].cert)
    renewed = issue(pki, tmp_path, "hub-a")  # the site's new certificate for the same hub
    caplog.set_level(logging.WARNING, logger="outpost.auth")
    async with start_outpost(**tls_traits(pki, revoked_certificates=[revoked])) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as a:
            for call in (a.list_servers(), a.start("alice", "s1", user_name="alice")):
                with pytest.raises(CertificateRevoked) as info:
                    await call
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.reason == CERTIFICATE_REVOKED
                assert "is revoked on this Outpost" in str(info.value) and "ask the site for a new one" in str(info.value)
            with pytest.raises(CertificateRevoked):
                async for _ in a.events("alice"):
                    pass
        assert op.manager.records == {}  # nothing was started
        # every other hub is served as before, and hub-a with its new certificate
        async with hub_client(op.address, pki, pki.hubs["hub-b"]) as b, hub_client(op.address, pki, renewed) as a2:
            await b.start("bob", "s1", user_name="bob", wait_until_ready=True)
            await a2.start("alice", "s2", user_name="alice", wait_until_ready=True)
        assert set(op.manager.records) == {("hub-b", "bob"), ("hub-a", "alice")}
    refusals = [r.getMessage() for r in caplog.records if "revoked client certificate" in r.getMessage()]
    assert len(refusals) == 1, refusals  # logged, once a minute per certificate, not per call
    assert show_fingerprint(revoked) in refusals[0] and "CN 'hub-a'" in refusals[0]


async def test_revocation_file_takes_effect_without_a_restart(start_outpost, pki, tmp_path, caplog):
    listing = tmp_path / "revoked"
    listing.write_text("# revoked hub certificates\n")
    async with start_outpost(**tls_traits(pki, revoked_certificates_file=str(listing))) as op:
        async with hub_client(op.address, pki, pki.hubs["hub-a"]) as a, hub_client(
            op.address, pki, pki.hubs["hub-b"]
        ) as b:
            assert await a.list_servers() == []
            with listing.open("a") as f:
                f.write(run_outpost("fingerprint", pki.hubs["hub-a"].cert, check=True).stdout)
            with pytest.raises(CertificateRevoked):
                await a.list_servers()
            assert await b.list_servers() == []
            # a broken file keeps the list it had (and says so in the log)
            caplog.set_level(logging.ERROR, logger="outpost.auth")
            with listing.open("a") as f:
                f.write("not a fingerprint\n")
            with pytest.raises(CertificateRevoked):
                await a.list_servers()
            assert "keeping the previous list" in caplog.text and "line 3" in caplog.text
            assert await b.list_servers() == []


def test_revocation_needs_certificates_to_check_and_a_readable_file(pki, tmp_path):
    token = {"hub-a": "sha256:" + "0" * 64}
    app = Outpost(tls_cert=pki.server.cert, tls_key=pki.server.key, hub_tokens=token, revoked_certificates=["ab" * 32])
    with pytest.raises(SystemExit, match="revoked_certificates lists client certificates, but this Outpost asks"):
        app.check_authentication()
    with pytest.raises(SystemExit, match=f"cannot read revoked_certificates_file {tmp_path}/missing"):
        Outpost(**tls_traits(pki, revoked_certificates_file=str(tmp_path / "missing"))).check_authentication()
    (tmp_path / "bad").write_text("ab" * 32 + "\nnope\n")
    with pytest.raises(SystemExit, match="revoked_certificates_file .*bad line 2: 'nope' is not a SHA-256"):
        Outpost(**tls_traits(pki, revoked_certificates_file=str(tmp_path / "bad"))).check_authentication()


def not_after(path: str) -> datetime.datetime:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc


def test_generate_certs_lifetime_is_one_year_by_default_and_configurable(tmp_path):
    """A hub's certificate (and so a stolen hub key) is good for a year unless the site says
    otherwise; the CA outlives it, so new certificates can come from the same CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    made = generate_certs(str(tmp_path / "default"), ["127.0.0.1"], ["hub-a"])
    for cert in (made.server.cert, made.hubs["hub-a"].cert):
        assert abs(not_after(cert) - (now + 365 * day)) < day, cert
    assert abs(not_after(made.ca.cert) - (now + 3650 * day)) < day

    out = run_outpost(
        "generate-certs", "--out", str(tmp_path / "short"), "--host", "127.0.0.1", "--hub", "hub-a",
        "--days", "30", "--ca-days", "400", timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    short = tmp_path / "short"
    for cert in ("outpost-server/outpost-server.crt", "hub-a/hub-a.crt"):
        assert abs(not_after(str(short / cert)) - (now + 30 * day)) < day, cert
        assert f"expires {(now + 30 * day).date()}" in out.stdout or f"expires {(now + 31 * day).date()}" in out.stdout
    assert abs(not_after(str(short / "outpost-ca/outpost-ca.crt")) - (now + 400 * day)) < day

    # --years (the old option) still works, in years of 365 days
    old = run_outpost(
        "generate-certs", "--out", str(tmp_path / "old"), "--host", "127.0.0.1", "--hub", "hub-a", "--years", "2",
        timeout=60,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    assert abs(not_after(str(tmp_path / "old/hub-a/hub-a.crt")) - (now + 730 * day)) < day

    with pytest.raises(CertsError, match="cannot outlive its CA"):
        generate_certs(str(tmp_path / "x"), ["h"], ["a"], days=400, ca_days=365)


def test_revocation_fails_closed_without_the_peer_certificate():
    """grpc puts the peer's certificate in the auth context; were it ever missing, a
    revocation list that cannot be checked lets nobody in, rather than everybody."""
    resolve = revoking(lambda context: "hub-a", RevokedCertificates(["ab" * 32]))
    with pytest.raises(Unauthenticated, match="cannot read your client certificate"):
        resolve(fake_context(x509_common_name=["hub-a"]))
