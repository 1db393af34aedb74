"""Encryption at rest of what the Outpost persists as secret: each server's ``env`` (it
holds the notebook's JUPYTERHUB_API_TOKEN) and its Spawner's state.

Keys are Fernet keys (32 url-safe base64-encoded bytes), like JupyterHub's
JUPYTERHUB_CRYPT_KEY: the first key encrypts, every key decrypts (rotation: put a new key
first, keep the old ones until every row has been rewritten, which each start-up does).

A value is stored in its JSON column as ``{"fernet": "<token>"}``, the token encrypting the
value's JSON. ``None`` stays NULL. A value that is not in this form is a row written before
encryption: it is read as it is, and re-encrypted at the next start-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENV_VAR = "OUTPOST_CRYPT_KEY"
MARKER = "fernet"
MAKE_KEY = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'


class CryptConfigError(Exception):
    """The keys are missing or unusable (a one-line message for the operator)."""


class DecryptionError(Exception):
    """No configured key decrypts a stored value."""


def parse_keys(text: str) -> list[str]:
    """Keys from OUTPOST_CRYPT_KEY or a key file: separated by ';' or new lines; blank
    lines and lines starting with '#' are ignored."""
    keys = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys.extend(k.strip() for k in line.split(";") if k.strip())
    return keys


def read_key_file(path: str) -> list[str]:
    try:
        with open(path) as f:
            return parse_keys(f.read())
    except OSError as e:
        raise CryptConfigError(f"crypt_key_file {path}: {e.strerror}; make a key with: {MAKE_KEY}") from None


class Crypt:
    """Encrypts and decrypts column values with a MultiFernet."""

    def __init__(self, keys: Iterable[str | bytes], *, source: str = "c.Outpost.crypt_keys"):
        fernets = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                # never echo the key itself
                raise CryptConfigError(
                    f"{source}: key {i} is not a Fernet key (32 url-safe base64-encoded bytes); "
                    f"make one with: {MAKE_KEY}"
                ) from None
        if not fernets:
            raise CryptConfigError(
                f"no encryption key for the database: set {ENV_VAR} (';'-separated keys), "
                f"c.Outpost.crypt_keys or c.Outpost.crypt_key_file; make a key with: {MAKE_KEY}"
            )
        self._first = fernets[0]
        self._all = MultiFernet(fernets)

    def encrypt(self, value: Any) -> dict[str, str] | None:
        if value is None:
            return None
        token = self._first.encrypt(json.dumps(value, separators=(",", ":")).encode())
        return {MARKER: token.decode("ascii")}

    @staticmethod
    def is_encrypted(stored: Any) -> bool:
        return isinstance(stored, dict) and len(stored) == 1 and isinstance(stored.get(MARKER), str)

    def decrypt(self, stored: Any) -> tuple[Any, bool]:
        """(value, stale): stale when the value is in plain text or encrypted with a key
        other than the first, i.e. should be written again. Raises DecryptionError."""
        if not self.is_encrypted(stored):
            return stored, stored is not None
        token = stored[MARKER].encode("ascii")
        try:
            return json.loads(self._first.decrypt(token)), False
        except InvalidToken:
            pass
        try:
            return json.loads(self._all.decrypt(token)), True
        except InvalidToken:
            raise DecryptionError("none of the configured keys decrypts it") from None


def key_file_warning(path: str) -> str | None:
    """A warning when a key file can be read by others than its owner."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"crypt_key_file {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it"
    return None
