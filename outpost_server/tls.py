"""The Outpost's mTLS server credentials: read and check the PEM files, once, with clear errors.

The TLS handshake itself refuses a client without a certificate, with one signed by a CA
the Outpost does not trust, or with one outside its validity period; which hub a valid
certificate names is decided per call by :func:`outpost_server.interceptors.certificate_resolver`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TLSConfigError(Exception):
    """The TLS files are missing, unreadable or do not fit together (a one-line message)."""


@dataclass(frozen=True)
class ServerTLS:
    cert: bytes
    key: bytes
    client_ca: bytes
    warnings: tuple[str, ...] = ()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=True
        )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read the TLS {what} {path}: {e.strerror}") from None


def load_server_tls(cert: str, key: str, client_ca: str) -> ServerTLS:
    """Read and check c.Outpost.tls_cert, tls_key and tls_client_ca (PEM files)."""
    cert_pem, key_pem, ca_pem = _read(cert, "certificate"), _read(key, "key"), _read(client_ca, "client CA")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSConfigError(f"tls_cert {cert} holds no PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"tls_key {key} is not an unencrypted PEM private key ({e})") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TLSConfigError(f"tls_client_ca {client_ca} holds no PEM certificate") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(serialization.Encoding.PEM, public) != private_key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise TLSConfigError(f"tls_key {key} is not the key of the certificate in tls_cert {cert}")
    warnings = []
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        warnings.append(f"TLS key {key} is readable by group or others (mode {mode:04o}); chmod 600 it")
    return ServerTLS(cert_pem, key_pem, ca_pem, tuple(warnings))
