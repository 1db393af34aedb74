"""Which config_overrides a hub may send (c.Outpost.allow_override): the rule checked as
pure functions, and :class:`OverridePolicy`, which enforces it for the manager."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from outpost_client.errors import OverrideNotAllowed

log = logging.getLogger("outpost.policy")

Policy = bool | Collection[str] | Mapping[str, Any] | Callable[[str, dict], Any]


def check_policy(policy: Any) -> Policy:
    """Raise ValueError unless policy is one of the shapes allow_override accepts."""
    if isinstance(policy, bool) or callable(policy):
        return policy
    if isinstance(policy, Mapping):
        for hub, rule in policy.items():
            if not isinstance(hub, str):
                raise ValueError(f"allow_override: hub names must be strings, not {hub!r}")
            check_policy(rule)
            if isinstance(rule, Mapping):
                raise ValueError(f"allow_override[{hub!r}]: a hub's rule is True, False, a list or a callable")
        return policy
    if isinstance(policy, (list, tuple, set, frozenset)) and all(isinstance(k, str) for k in policy):
        return policy
    raise ValueError(
        "allow_override must be True, False, a list of trait names, a dict of hub -> one of "
        "those, or a callable (hub, overrides) -> one of those"
    )


async def denied_overrides(policy: Policy, hub: str, overrides: dict[str, Any]) -> list[str]:
    """The keys of overrides this hub may not send (empty: all allowed).

    A dict is looked up by hub (a hub it does not name may override nothing); a callable
    is called with (hub, overrides), sync or async, and answers like any other rule.
    """
    if isinstance(policy, Mapping):
        policy = policy.get(hub, False)
    if callable(policy):
        policy = policy(hub, dict(overrides))
        if inspect.isawaitable(policy):
            policy = await policy
        check_policy(policy)
        if callable(policy) or isinstance(policy, Mapping):
            raise ValueError("allow_override: a callable must answer True, False or a list of trait names")
    if policy is True:
        return []
    if policy is False or policy is None:
        return sorted(overrides)
    return sorted(set(overrides) - set(policy))


class OverridePolicy:
    """c.Outpost.allow_override, enforced: check() refuses what a hub may not override."""

    def __init__(self, rule: Policy):
        self.rule = check_policy(rule)

    async def check(self, hub: str, overrides: dict[str, Any]) -> None:
        """Raise OverrideNotAllowed (PERMISSION_DENIED) naming the keys hub may not send."""
        try:
            denied = await denied_overrides(self.rule, hub, overrides)
        except Exception as e:
            # a site's policy callable raising is a refusal; its message is the reason
            log.warning("allow_override refused %s for hub %r: %s", sorted(overrides), hub, e)
            raise OverrideNotAllowed(
                f"This Outpost does not allow these overrides: {e}", metadata={"keys": ",".join(sorted(overrides))}
            ) from None
        if denied:
            raise OverrideNotAllowed(
                f"This Outpost does not allow your hub to override {', '.join(denied)}.",
                metadata={"keys": ",".join(denied)},
            )
