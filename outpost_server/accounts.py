"""Which local account a hub's user runs as: c.Outpost.user_mapping and c.Outpost.allow_users.

A hosted Spawner turns its ``self.user.name`` into an account at the site:
LocalProcessSpawner looks it up in passwd and runs the notebook as it, batchspawner runs
``sudo -u {username} sbatch``, KubeSpawner names pods after it. That name is the site's
to choose, not the hub's: the hub sends its user's name, and the mapping below makes the
local account of it, per hub. Then the account policy refuses, whatever the Spawner,
root and every existing account outside the site's range of user ids (system accounts:
below UID_MIN or above UID_MAX of /etc/login.defs), names that are not plain user names,
and what allow_users does not allow. A refusal is PERMISSION_DENIED with reason
USER_NOT_ALLOWED, before anything is made or stored.

Pure checks here (tested without sockets); :class:`AccountPolicy` enforces them for the
lifecycle manager's admission.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pwd
import re
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any

from outpost_client.errors import UserNotAllowed

from .policy import check_policy

log = logging.getLogger("outpost.accounts")

UserMapping = str | Mapping[str, Any] | Callable[[str, str], Any]

#: the mapping when c.Outpost.user_mapping is not set and only one hub can use the Outpost
DEFAULT_MAPPING = "{name}"
TEMPLATE_FIELDS = frozenset({"hub", "name"})

#: a plain user name (POSIX's portable set, as useradd takes it): letters, digits, "._-",
#: not starting with "." or "-", at most 32 characters; all digits would read as a uid
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")
ACCOUNT_NAME_RULE = "letters, digits, '.', '_' and '-', at most 32 characters, not starting with '.' or '-'"

LOGIN_DEFS = "/etc/login.defs"
#: how long (seconds) and for how many accounts a passwd lookup's answer is kept
LOOKUP_TTL, LOOKUP_CACHE_SIZE = 60.0, 4096
DEFAULT_UID_MIN, DEFAULT_UID_MAX = 1000, 60000


class AccountsConfigError(ValueError):
    """user_mapping or allow_users cannot work as configured (a one-line message)."""


# --- the mapping ---------------------------------------------------------------------------


def check_template(template: str, option: str = "user_mapping") -> str:
    """Raise ValueError unless template uses only {hub} and {name}, plainly."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{option}: {template!r} is not a valid template ({e})") from None
    for _, field_name, format_spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in TEMPLATE_FIELDS or format_spec or conversion:
            raise ValueError(f"{option}: {template!r} may use only {{hub}} and {{name}}, as they are")
    return template


def check_mapping(mapping: Any, option: str = "user_mapping") -> UserMapping | None:
    """Raise ValueError unless mapping is one of the shapes user_mapping accepts."""
    if mapping is None or callable(mapping):
        return mapping
    if isinstance(mapping, str):
        return check_template(mapping, option)
    if isinstance(mapping, Mapping):
        for hub, rule in mapping.items():
            if not isinstance(hub, str):
                raise ValueError(f"{option}: hub names must be strings, not {hub!r}")
            if isinstance(rule, str):
                check_template(rule, f"{option}[{hub!r}]")
            elif isinstance(rule, Mapping):
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in rule.items()):
                    raise ValueError(f"{option}[{hub!r}]: a dict maps hub user names to local account names (strings)")
            else:
                raise ValueError(f"{option}[{hub!r}]: a hub's rule is a template or a dict of hub user -> account")
        return mapping
    raise ValueError(
        f"{option} must be a template such as \"{{hub}}-{{name}}\", a dict of hub -> template or "
        "hub -> {hub user: local account}, or a callable (hub, name) -> local account"
    )


async def map_user(mapping: UserMapping, hub: str, name: str) -> str | None:
    """The local account of hub's user name (None: the mapping gives none).

    A callable is called with (hub, name), sync or async; what it raises is the caller's
    to handle (a refusal)."""
    if isinstance(mapping, str):
        return mapping.format(hub=hub, name=name)
    if isinstance(mapping, Mapping):
        rule = mapping.get(hub)
        if rule is None:
            return None
        if isinstance(rule, Mapping):
            return rule.get(name)
        return rule.format(hub=hub, name=name)
    account = mapping(hub, name)
    if inspect.isawaitable(account):
        account = await account
    if account is not None and not isinstance(account, str):
        raise TypeError(f"user_mapping returned {type(account).__name__}, not a name")
    return account or None


# --- the accounts the site never gives out ------------------------------------------------------


def read_login_defs(path: str = LOGIN_DEFS) -> tuple[int, int]:
    """(UID_MIN, UID_MAX) of the site's login.defs (1000, 60000 where it says nothing)."""
    found = {"UID_MIN": DEFAULT_UID_MIN, "UID_MAX": DEFAULT_UID_MAX}
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] in found and words[1].isdigit():
                    found[words[0]] = int(words[1])
    except OSError:
        pass
    return found["UID_MIN"], found["UID_MAX"]


def valid_account_name(account: str) -> bool:
    return bool(ACCOUNT_NAME_RE.fullmatch(account)) and not account.isdigit()


def system_account(account: str, uid_min: int, uid_max: int) -> int | None:
    """The uid of account if it is root or a system account at this site, else None.

    An account that does not exist here is not one (KubeSpawner needs no local account;
    LocalProcessSpawner and sudo fail on it by themselves)."""
    try:
        uid = pwd.getpwnam(account).pw_uid
    except KeyError:
        return 0 if account == "root" else None
    if uid == 0 or uid < uid_min or uid > uid_max:
        return uid
    return None


async def account_allowed(rule: Any, hub: str, account: str) -> bool:
    """Whether allow_users lets hub's users run as account (True/False, a list, a dict
    per hub, or a callable (hub, account) answering one of those)."""
    if isinstance(rule, Mapping):
        rule = rule.get(hub, False)
    if callable(rule):
        rule = rule(hub, account)
        if inspect.isawaitable(rule):
            rule = await rule
        if callable(rule) or isinstance(rule, Mapping):
            raise ValueError("allow_users: a callable must answer True, False or a list of accounts")
    if rule is True:
        return True
    if rule is False or rule is None:
        return False
    if isinstance(rule, Collection) and not isinstance(rule, str):
        return account in rule
    raise ValueError("allow_users: a callable must answer True, False or a list of accounts")


# --- how many hubs may call: whether a mapping must be chosen ------------------------------------


def configured_hubs(
    *,
    tls: bool,
    client_ca: bool,
    hub_tokens: Collection[str],
    identity_map: Mapping[str, str],
    allowed_hubs: Collection[str],
    default_hub: str,
    forwarder_hubs: Collection[str] = (),
) -> set[str] | None:
    """The hubs this configuration lets use the Outpost (None: any number of them).

    Tokens name their hubs; with mTLS and neither tokens nor allowed_hubs any certificate
    the CA signed is a hub; plaintext without tokens is default_hub alone. Every hub the
    configuration names anywhere counts too (hub_identity_map, allowed_hubs, the SSH
    forwarder's authorized_keys)."""
    hubs = set(hub_tokens) | set(identity_map.values()) | set(allowed_hubs) | set(forwarder_hubs)
    if not hub_tokens:
        if tls and client_ca:
            if not allowed_hubs:
                return None
        elif not tls:
            hubs.add(default_hub)
    return hubs


def default_mapping(hubs: set[str] | None) -> str:
    """The mapping of an Outpost whose site did not set user_mapping: "{name}" for one hub;
    with several, AccountsConfigError (the site must choose)."""
    if hubs is not None and len(hubs) <= 1:
        return DEFAULT_MAPPING
    who = (
        "any hub with a certificate from tls_client_ca can use this Outpost (allowed_hubs is empty)"
        if hubs is None
        else f"hubs {', '.join(sorted(hubs))} can use this Outpost"
    )
    raise AccountsConfigError(
        f"{who}: set c.Outpost.user_mapping to choose which local account each hub's user runs as, "
        'e.g. "{hub}-{name}" (keeps the hubs\' users apart) or "{name}" (hubs share accounts by name, deliberately)'
    )


# --- enforced ----------------------------------------------------------------------------------


class AccountPolicy:
    """user_mapping and allow_users, enforced: local_account() answers the account a hub's
    user runs as, or refuses with UserNotAllowed (PERMISSION_DENIED)."""

    def __init__(self, mapping: UserMapping, allow: Any = True, *, uid_min: int, uid_max: int):
        self.mapping = check_mapping(mapping)
        self.allow = check_policy(allow, "allow_users")
        if uid_min > uid_max:
            raise AccountsConfigError(f"account_uid_min ({uid_min}) is above account_uid_max ({uid_max})")
        self.uid_min, self.uid_max = uid_min, uid_max
        self._uids: OrderedDict[str, tuple[float, int | None]] = OrderedDict()  # system_uid()'s

    async def system_uid(self, account: str) -> int | None:
        """system_account(), looked up in a thread (with LDAP or sssd behind passwd a lookup
        may take a while, and the event loop serves every hub) and remembered for
        LOOKUP_TTL seconds (a user's next start costs no lookup)."""
        now = time.monotonic()
        known = self._uids.get(account)
        if known is not None and known[0] > now:
            return known[1]
        uid = await asyncio.to_thread(system_account, account, self.uid_min, self.uid_max)
        self._uids[account] = (now + LOOKUP_TTL, uid)
        self._uids.move_to_end(account)
        while len(self._uids) > LOOKUP_CACHE_SIZE:
            self._uids.popitem(last=False)
        return uid

    async def local_account(self, hub: str, name: str) -> str:
        meta = {"user_name": name}
        try:
            account = await map_user(self.mapping, hub, name)
        except Exception as e:
            log.warning("user_mapping refused %r of hub %r: %s", name, hub, e)
            raise UserNotAllowed(
                f"This Outpost does not run servers for {name!r}: {e}", metadata=meta
            ) from None
        if not account:
            log.warning("user_mapping has no local account for %r of hub %r", name, hub)
            raise UserNotAllowed(
                f"This Outpost has no local account for your user {name!r}; ask the site's "
                "administrators to map your hub's users (c.Outpost.user_mapping).",
                metadata=meta,
            )
        meta["account"] = account
        if not valid_account_name(account):
            log.warning("Refused account %r (of %r of hub %r): not a plain user name", account, name, hub)
            raise UserNotAllowed(
                f"This Outpost cannot run servers as {account!r} (the account of your user "
                f"{name!r}): a local account name has {ACCOUNT_NAME_RULE}.",
                metadata=meta,
            )
        uid = await self.system_uid(account)
        if uid is not None:
            log.warning("Refused account %r (uid %d) to %r of hub %r: a system account", account, uid, name, hub)
            raise UserNotAllowed(
                f"This Outpost never runs servers as {account!r}: it is a system account at this site.",
                metadata=meta,
            )
        try:
            allowed = await account_allowed(self.allow, hub, account)
        except Exception as e:
            log.warning("allow_users refused %r of hub %r: %s", account, hub, e)
            raise UserNotAllowed(f"This Outpost does not run servers as {account!r}: {e}", metadata=meta) from None
        if not allowed:
            log.warning("allow_users does not allow account %r to hub %r", account, hub)
            raise UserNotAllowed(
                f"This Outpost does not run servers as {account!r} for your hub (c.Outpost.allow_users).",
                metadata=meta,
            )
        return account
