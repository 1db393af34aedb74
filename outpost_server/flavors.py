"""Flavors: the named resource sets a site offers its hubs (c.Outpost.flavors, flavors_file).

A :class:`Flavor` is what one start runs under: the Spawner configuration the site applies
(after the hub's config_overrides, so a hub cannot change it), its limits (servers in
total, per hub, per user; a maximum runtime) and who may use it (hubs, users, hub groups,
admins). A :class:`FlavorSet` is the site's flavors at one moment (a SIGHUP may replace
it; a running server keeps the flavor it was admitted under: its record stores the name
and the configuration). It answers, as pure functions tested without sockets: which
flavors a hub may offer, the default, whether a (hub, user) may use one, and whether a
start would exceed a limit given the current usage (:class:`Usage`).

Counting the usage and taking the server's record in one step is the lifecycle manager's
(manager.py); this module only decides.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from outpost_client.errors import FlavorLimitReached, FlavorNotAllowed, InvalidArgument, UnknownFlavor

from .validation import FLAVOR_NAME_RE

#: a flavor's name: as a server name, at most 64 characters (the proto's Flavor.name)
NAME_RE = FLAVOR_NAME_RE
#: the fields of one flavor in c.Outpost.flavors and the flavors file
FIELDS = frozenset(
    {
        "display_name",
        "description",
        "config",
        "max_total",
        "max_per_hub",
        "max_per_user",
        "max_runtime",
        "hubs",
        "users",
        "users_regex",
        "groups",
        "admin_only",
        "weight",
        "default",
    }
)
LIMITS = ("max_total", "max_per_hub", "max_per_user")
MAX_LIMIT = 2**31 - 1


class FlavorConfigError(ValueError):
    """The flavors cannot work as configured (a one-line message naming flavor and field)."""


@dataclass(frozen=True)
class Flavor:
    """One flavor, checked (see :func:`parse_flavor` for the fields)."""

    name: str
    display_name: str = ""
    description: str = ""
    #: Spawner traits the site sets for every start of this flavor (after the hub's
    #: config_overrides: the flavor's value wins)
    config: Mapping[str, Any] = field(default_factory=dict)
    max_total: int = 0
    max_per_hub: int = 0
    max_per_user: int = 0
    #: seconds a server of this flavor may run (0: no limit); enforced by the runtime code
    max_runtime: float = 0.0
    #: hub names or globs that may offer it (empty: every hub)
    hubs: tuple[str, ...] = ()
    #: user names or globs, a regex (full match), hub groups: when any is set, a user
    #: must match one of them
    users: tuple[str, ...] = ()
    users_regex: re.Pattern | None = None
    groups: tuple[str, ...] = ()
    admin_only: bool = False
    weight: int = 0
    default: bool = False

    def offered_to(self, hub: str) -> bool:
        """Whether hub may offer this flavor at all (ListFlavors lists it)."""
        return not self.hubs or any(fnmatch.fnmatchcase(hub, pattern) for pattern in self.hubs)

    def refusal_for_user(self, user: Mapping[str, Any]) -> str:
        """Why this (hub's) user may not use the flavor, as a sentence; "" if they may."""
        if self.admin_only and not user.get("admin"):
            return f"Flavor {self.name!r} is only for administrators."
        if not (self.users or self.users_regex or self.groups):
            return ""
        name = user.get("name", "")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.users):
            return ""
        if self.users_regex is not None and self.users_regex.fullmatch(name):
            return ""
        if set(self.groups) & set(user.get("groups") or ()):
            return ""
        if self.groups and not (self.users or self.users_regex):
            return f"Flavor {self.name!r} is not for your groups."
        return f"Flavor {self.name!r} is not for your account."

    def record(self) -> dict[str, Any]:
        """What a server's record keeps of the flavor it was admitted under (a reload
        that changes or removes the flavor does not change a running server)."""
        return {"config": dict(self.config), "max_runtime": self.max_runtime}


@dataclass(frozen=True)
class Usage:
    """Active servers (starting, running, stopping, unknown) of one flavor: in total at the
    Outpost, of one hub, of one of its users; and that user's servers across flavors."""

    total: int = 0
    hub: int = 0
    user: int = 0
    user_total: int = 0


def limit_refusal(flavor: Flavor | None, usage: Usage, max_per_user: int) -> FlavorLimitReached | None:
    """The refusal of one more server of flavor (None: no flavor) under usage, or None.

    The user's own limits first (they can act on them: stop a server), then the hub's
    share, then the flavor's total; max_per_user is the site's cap on one user's servers
    across flavors (0: none)."""
    name = flavor.name if flavor is not None else ""
    checks = [("user_total", max_per_user, usage.user_total)]
    if flavor is not None:
        checks += [
            ("user", flavor.max_per_user, usage.user),
            ("hub", flavor.max_per_hub, usage.hub),
            ("total", flavor.max_total, usage.total),
        ]
    for limit, maximum, in_use in checks:
        if maximum > 0 and in_use >= maximum:
            return FlavorLimitReached(
                limit_sentence(limit, name, maximum),
                metadata={"flavor": name, "limit": limit, "max": str(maximum), "in_use": str(in_use)},
            )
    return None


def limit_sentence(limit: str, flavor: str, maximum: int) -> str:
    """What a user reads when flavor's limit (total, hub, user, user_total) is reached."""
    servers = "1 server" if maximum == 1 else f"{maximum} servers"
    if limit == "user_total":
        return (
            f"You already have {servers} on this Outpost, the most it allows one user. "
            "Stop one you no longer need, then try again."
        )
    if limit == "user":
        return (
            f"You already have {servers} of flavor {flavor!r}, the most allowed. Stop one, "
            "or choose another flavor."
        )
    if limit == "hub":
        return (
            f"Your hub's share of flavor {flavor!r} ({servers}) is in use. Try again when one "
            "is stopped, or choose another flavor."
        )
    if maximum == 1:
        return f"The one server of flavor {flavor!r} is in use. Try again when it is stopped, or choose another flavor."
    return (
        f"All {servers} of flavor {flavor!r} are in use. Try again when one is stopped, or "
        "choose another flavor."
    )


# --- parsing the configuration ------------------------------------------------------------


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise FlavorConfigError(f"{where}: a list of non-empty strings, not {value!r}")
    return tuple(value)


def _count(value: Any, where: str, maximum: float = MAX_LIMIT) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value > maximum:
        raise FlavorConfigError(f"{where}: a number from 0 to {maximum} (0: none), not {value!r}")
    return value


def parse_flavor(name: Any, spec: Any, spawner_class: type | None = None) -> Flavor:
    """One flavor of the configuration, checked; FlavorConfigError names flavor and field.

    spawner_class: when given, config's keys must be its configurable traits and the
    values must fit them (a site's mistake is found at start-up, not by a user's start).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise FlavorConfigError(
            f"flavors: {name!r} is not a flavor name (1 to 64 ASCII letters, digits or '._@+-', "
            "starting with a letter or digit)"
        )
    where = f"flavors[{name!r}]"
    if not isinstance(spec, Mapping):
        raise FlavorConfigError(f"{where}: a dict of its fields, not {type(spec).__name__}")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise FlavorConfigError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    kw: dict[str, Any] = {}
    for key in ("display_name", "description"):
        if key in spec:
            if not isinstance(spec[key], str):
                raise FlavorConfigError(f"{where}.{key}: a string, not {spec[key]!r}")
            kw[key] = spec[key]
    for key in LIMITS:
        if key in spec:
            value = _count(spec[key], f"{where}.{key}")
            if not isinstance(value, int):
                raise FlavorConfigError(f"{where}.{key}: a whole number, not {value!r}")
            kw[key] = value
    if "max_runtime" in spec:
        kw["max_runtime"] = float(_count(spec["max_runtime"], f"{where}.max_runtime", 10 * 365 * 86400))
    for key in ("hubs", "users", "groups"):
        if key in spec:
            kw[key] = _strings(spec[key], f"{where}.{key}")
    if spec.get("users_regex") is not None:
        try:
            kw["users_regex"] = re.compile(spec["users_regex"])
        except (re.error, TypeError) as e:
            raise FlavorConfigError(f"{where}.users_regex: not a regular expression ({e})") from None
    for key in ("admin_only", "default"):
        if key in spec:
            if not isinstance(spec[key], bool):
                raise FlavorConfigError(f"{where}.{key}: true or false, not {spec[key]!r}")
            kw[key] = spec[key]
    if "weight" in spec:
        if isinstance(spec["weight"], bool) or not isinstance(spec["weight"], int):
            raise FlavorConfigError(f"{where}.weight: a whole number, not {spec['weight']!r}")
        kw["weight"] = spec["weight"]
    config = spec.get("config") or {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise FlavorConfigError(f"{where}.config: a dict of Spawner option -> value, not {config!r}")
    if spawner_class is not None:
        check_spawner_config(config, spawner_class, f"{where}.config")
    kw["config"] = dict(config)
    return Flavor(name=name, **kw)


def check_spawner_config(config: Mapping[str, Any], spawner_class: type, where: str) -> None:
    """Each key a configurable trait of spawner_class, each value one it accepts."""
    from traitlets import TraitError

    traits = spawner_class.class_traits(config=True)
    for key, value in config.items():
        trait = traits.get(key)
        if trait is None:
            raise FlavorConfigError(f"{where}: {spawner_class.__name__} has no configurable option {key!r}")
        try:
            trait.validate(None, value)
        except TraitError as e:
            raise FlavorConfigError(f"{where}.{key}: {' '.join(str(e).split())}") from None
        except Exception:
            pass  # a trait that needs its object to check: checked when a start applies it


class FlavorSet:
    """The site's flavors at one moment, and the site's per-user cap across flavors."""

    def __init__(self, flavors: Iterable[Flavor] = (), max_servers_per_user: int = 0):
        self.by_name: dict[str, Flavor] = {}
        for flavor in sorted(flavors, key=lambda f: (f.weight, f.name)):
            self.by_name[flavor.name] = flavor
        self.max_servers_per_user = max_servers_per_user
        defaults = [f.name for f in self.by_name.values() if f.default]
        if len(defaults) > 1:
            raise FlavorConfigError(f"flavors: only one flavor may be the default, not {', '.join(defaults)}")

    @classmethod
    def parse(
        cls, config: Mapping[str, Any], *, max_servers_per_user: int = 0, spawner_class: type | None = None
    ) -> FlavorSet:
        if not isinstance(config, Mapping):
            raise FlavorConfigError(f"flavors: a dict of flavor name -> its fields, not {type(config).__name__}")
        return cls(
            (parse_flavor(name, spec, spawner_class) for name, spec in config.items()),
            max_servers_per_user=max_servers_per_user,
        )

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def offered(self, hub: str) -> list[Flavor]:
        """The flavors hub may offer, by weight, then name."""
        return [f for f in self.by_name.values() if f.offered_to(hub)]

    def default_for(self, hub: str) -> Flavor | None:
        """The flavor a Start of hub without one gets (None: hub must name one)."""
        for flavor in self.by_name.values():
            if flavor.default and flavor.offered_to(hub):
                return flavor
        return None

    def resolve(self, hub: str, user: Mapping[str, Any], name: str) -> Flavor | None:
        """The flavor a Start of hub's user runs under (None: the Outpost has no flavors).

        Raises UnknownFlavor (INVALID_ARGUMENT: no such flavor, or not one of this hub's),
        InvalidArgument (no flavor named and no default for this hub) or FlavorNotAllowed
        (PERMISSION_DENIED: one of the hub's flavors this user may not use)."""
        if not self.by_name:
            if name:
                raise UnknownFlavor(
                    f"This Outpost has no flavors; start without one (not {name!r}).",
                    metadata={"flavor": name},
                )
            return None
        if not name:
            flavor = self.default_for(hub)
            if flavor is None:
                raise InvalidArgument(
                    "flavor: is required: this Outpost has no default flavor for your hub; "
                    "choose one of those ListFlavors names.",
                    metadata={"field": "flavor"},
                )
        else:
            flavor = self.by_name.get(name)
            # a flavor of other hubs is answered exactly as one that does not exist, as
            # ListFlavors hides it: a hub learns nothing of what the site gives others
            if flavor is None or not flavor.offered_to(hub):
                raise UnknownFlavor(
                    f"This Outpost has no flavor {name!r} for your hub; choose one of those it offers.",
                    metadata={"flavor": name},
                )
        why = flavor.refusal_for_user(user)
        if why:
            raise FlavorNotAllowed(why, metadata={"flavor": flavor.name})
        return flavor
