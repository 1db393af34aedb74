"""Making the hosted Spawner of a record, and calling into it without being hurt by it.

A site's Spawner is code the Outpost does not control: every call that is not the
start/poll/stop the lifecycle code awaits goes through one of the guards below, which log
what it raised instead of letting it end the Outpost's own work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jupyterhub.spawner import Spawner

from . import orphans
from .hosting import apply_overrides, certs_location, make_spawner, remove_certificates, stand_ins_from_env
from .records import Record

log = logging.getLogger("outpost.manager")


class SpawnerFactory:
    """Makes the Spawner of a record: the configured class, the site's config, and what
    the hub sent (user, env, user_options, overrides) as the hosting module allows it."""

    def __init__(
        self,
        spawner_class: type[Spawner],
        config,
        *,
        site_env_keys: frozenset[str],
        on_created: Callable[[Record, Spawner], None] | None = None,
    ):
        self.spawner_class = spawner_class
        self.config = config
        self.site_env_keys = site_env_keys
        #: called with every Spawner made (the hub API relay attaches here)
        self.on_created = on_created

    def new(self, rec: Record) -> Spawner:
        spec = rec.spec
        user, hub = stand_ins_from_env(
            spec.env,
            spec.user["name"],
            spec.user.get("id", 0),
            spec.user.get("admin", False),
            spec.user.get("groups", []),
            account=spec.user.get("account", ""),  # the local account (accounts.py)
            auth_state=spec.auth_state,
        )
        spawner = make_spawner(
            self.spawner_class,
            config=self.config,
            spawner_name=spec.spawner_name,
            user=user,
            hub=hub,
            env=spec.env,
            user_options=spec.user_options,
            site_env_keys=self.site_env_keys,
            overrides=spec.config_overrides,
            log=log.getChild(f"{rec.hub}.{rec.name}"),
        )
        if spec.flavor_config:
            # the site's, after the hub's overrides: a hub cannot change what its flavor sets
            apply_overrides(spawner, spec.flavor_config)
        spawner._outpost_hub = rec.hub  # which hub it serves (for the Outpost's own logs and tests)
        # passed on to local notebook processes: a restart can find them (orphans.py)
        spawner._outpost_hub_env[orphans.START_MARKER_ENV] = orphans.start_marker(
            rec.hub, rec.name, rec.start_id
        )
        if self.on_created is not None:
            self.on_created(rec, spawner)
        return spawner

    def restored(self, rec: Record) -> Spawner:
        """rec's Spawner made again, with its stored state loaded (after a restart, or to
        stop what a forgotten start made)."""
        spawner = self.new(rec)
        spawner.load_state(rec.spawner_state or {})
        rec.spawner = spawner
        return spawner


def user_message(error: BaseException) -> str:
    """The message of a Spawner's exception, as the user should see it."""
    message = getattr(error, "jupyterhub_message", None) or str(error)
    if isinstance(error, asyncio.TimeoutError) and not message:
        message = "The server did not start in time."
    return message or f"The server failed to start ({type(error).__name__})."


def safe_state(spawner: Spawner) -> dict | None:
    try:
        return spawner.get_state()
    except Exception:
        log.exception("get_state() raised")
        return None


def recall_state(spawner: Spawner, state: dict | None) -> None:
    """Give a Spawner that forgot what it made (its get_state() is empty) the state that
    was stored for it: batchspawner turns a cancel into "job not found" and clears its
    job id, and its stop() would then cancel nothing."""
    if state and not safe_state(spawner):
        spawner.load_state(state)


def run_post_stop_hook(spawner: Spawner) -> None:
    try:
        spawner.run_post_stop_hook()
    except Exception:
        log.exception("post_stop_hook raised")


def remove_start_certificates(rec: Record, certs_dir: str | None) -> None:
    """Remove the internal_ssl files the Outpost wrote for rec's start (if any)."""
    try:
        if remove_certificates(*certs_location(rec.hub, rec.name, rec.start_id, certs_dir)):
            log.info("Removed the internal_ssl certificates of %s/%s", rec.hub, rec.name)
    except Exception:
        log.exception("Removing the internal_ssl certificates of %s/%s failed", rec.hub, rec.name)

