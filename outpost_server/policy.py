"""What a hub may send that reaches the site's Spawner: config_overrides
(c.Outpost.allow_override), env keys (c.Outpost.allow_env), user_options keys
(c.Outpost.allow_user_options) and the user's auth_state (c.Outpost.allow_auth_state, by
its top-level keys).

Each is a rule of the same shapes, checked as pure functions here, and enforced for the
manager by a :class:`KeyPolicy`: default-deny, and a refusal names the keys and reaches
the hub's user as PERMISSION_DENIED with the policy's reason.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from outpost_client.errors import (
    AuthStateNotAllowed,
    EnvNotAllowed,
    OverrideNotAllowed,
    PermissionDenied,
    UserOptionNotAllowed,
)

log = logging.getLogger("outpost.policy")

Policy = bool | Collection[str] | Mapping[str, Any] | Callable[[str, dict], Any]

# env keys every hub may send: what JupyterHub's own Spawner.get_env() sets for a notebook
# (JUPYTERHUB_*, the API token's old name, the resource limits it announces)
DEFAULT_HUB_ENV_PREFIX = "JUPYTERHUB_"
DEFAULT_HUB_ENV_KEYS = frozenset({"JPY_API_TOKEN", "MEM_LIMIT", "MEM_GUARANTEE", "CPU_LIMIT", "CPU_GUARANTEE"})


def default_hub_env_key(key: str) -> bool:
    """Whether every hub may send this env key (c.Outpost.allow_env need not name it)."""
    return key.startswith(DEFAULT_HUB_ENV_PREFIX) or key in DEFAULT_HUB_ENV_KEYS


def check_policy(policy: Any, option: str = "allow_override") -> Policy:
    """Raise ValueError unless policy is one of the shapes a policy option accepts."""
    if isinstance(policy, bool) or callable(policy):
        return policy
    if isinstance(policy, Mapping):
        for hub, rule in policy.items():
            if not isinstance(hub, str):
                raise ValueError(f"{option}: hub names must be strings, not {hub!r}")
            check_policy(rule, option)
            if isinstance(rule, Mapping):
                raise ValueError(f"{option}[{hub!r}]: a hub's rule is True, False, a list or a callable")
        return policy
    if isinstance(policy, (list, tuple, set, frozenset)) and all(isinstance(k, str) for k in policy):
        return policy
    raise ValueError(
        f"{option} must be True, False, a list of names, a dict of hub -> one of "
        "those, or a callable (hub, values) -> one of those"
    )


async def denied_keys(
    policy: Policy, hub: str, values: dict[str, Any], option: str = "allow_override"
) -> list[str]:
    """The keys of values this hub may not send (empty: all allowed).

    A dict is looked up by hub (a hub it does not name may send none); a callable is
    called with (hub, values), sync or async, and answers like any other rule.
    """
    if isinstance(policy, Mapping):
        policy = policy.get(hub, False)
    if callable(policy):
        policy = policy(hub, dict(values))
        if inspect.isawaitable(policy):
            policy = await policy
        check_policy(policy, option)
        if callable(policy) or isinstance(policy, Mapping):
            raise ValueError(f"{option}: a callable must answer True, False or a list of keys")
    if policy is True:
        return []
    if policy is False or policy is None:
        return sorted(values)
    return sorted(set(values) - set(policy))


class KeyPolicy:
    """One policy option, enforced: check() refuses the keys a hub may not send."""

    def __init__(
        self,
        rule: Policy,
        *,
        option: str,
        denied: str,
        refused: str,
        error: type[PermissionDenied],
        always_allowed: Callable[[str], bool] = lambda key: False,
    ):
        self.rule = check_policy(rule, option)
        self.option = option
        # the messages the hub's user reads: denied names the keys ({keys}), refused gives
        # the reason a site's callable raised ({why})
        self.denied, self.refused = denied, refused
        self.error = error
        self.always_allowed = always_allowed

    async def check(self, hub: str, values: dict[str, Any]) -> None:
        """Raise the policy's error (PERMISSION_DENIED) naming what hub may not send."""
        asked = {key: value for key, value in values.items() if not self.always_allowed(key)}
        if not asked:
            return
        try:
            denied = await denied_keys(self.rule, hub, asked, self.option)
        except Exception as e:
            # a site's policy callable raising is a refusal; its message is the reason
            log.warning("%s refused %s for hub %r: %s", self.option, sorted(asked), hub, e)
            raise self.error(
                self.refused.format(why=e), metadata={"keys": ",".join(sorted(asked))}
            ) from None
        if denied:
            log.warning("%s refused %s for hub %r", self.option, denied, hub)
            raise self.error(self.denied.format(keys=", ".join(denied)), metadata={"keys": ",".join(denied)})


def override_policy(rule: Policy) -> KeyPolicy:
    return KeyPolicy(
        rule,
        option="allow_override",
        denied="This Outpost does not allow your hub to override {keys}.",
        refused="This Outpost does not allow these overrides: {why}",
        error=OverrideNotAllowed,
    )


def env_policy(rule: Policy) -> KeyPolicy:
    return KeyPolicy(
        rule,
        option="allow_env",
        denied="This Outpost does not accept the environment variables {keys} from your hub.",
        refused="This Outpost does not accept this environment: {why}",
        error=EnvNotAllowed,
        always_allowed=default_hub_env_key,
    )


def user_options_policy(rule: Policy) -> KeyPolicy:
    return KeyPolicy(
        rule,
        option="allow_user_options",
        denied="This Outpost does not accept the server options {keys} from your hub.",
        refused="This Outpost does not accept these server options: {why}",
        error=UserOptionNotAllowed,
    )


#: why an Outpost serving plaintext refuses auth_state, whatever allow_auth_state says
PLAINTEXT_AUTH_STATE = (
    "this Outpost serves plaintext gRPC, and auth_state (the user's credentials) travels "
    "only over TLS; ask the site to serve TLS, or stop sending it (OutpostSpawner.send_auth_state)"
)


def _refuse_in_clear(hub: str, values: dict) -> bool:
    raise PermissionError(PLAINTEXT_AUTH_STATE)


def auth_state_policy(rule: Policy, *, tls: bool) -> KeyPolicy:
    """allow_auth_state, enforced on the auth_state's top-level keys; an Outpost without
    TLS refuses every auth_state (the hub's OutpostSpawner never sends it in clear either)."""
    if not tls:
        check_policy(rule, "allow_auth_state")  # still a configuration error if malformed
        rule = _refuse_in_clear
    return KeyPolicy(
        rule,
        option="allow_auth_state",
        denied="This Outpost does not accept the auth_state keys {keys} from your hub; ask your "
        "hub's administrators (OutpostSpawner.send_auth_state, auth_state_filter) or the site's "
        "(c.Outpost.allow_auth_state).",
        refused="This Outpost does not accept auth_state from your hub: {why}",
        error=AuthStateNotAllowed,
    )
