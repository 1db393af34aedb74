"""Hosting a real JupyterHub Spawner outside of JupyterHub.

A Spawner expects to live inside a hub: it reads ``self.user``, ``self.hub``,
``self.name`` and ``self.server`` and computes the notebook's environment in ``get_env()``.
Here those come from what the hub sent in StartRequest: :class:`StandInUser` and
:class:`StandInHub` carry it, and :func:`hosted_spawner_class` wraps the configured class so
that ``name`` and ``get_env()`` answer with the hub's values.

The notebook's environment is the hosted Spawner's own ``get_env()`` (its ``environment``
config, ``env_keep``, user env such as HOME) with the hub's env laid over it, except for
keys the site owns: the Spawner's ``environment`` config and ``Outpost.site_env_keys``
(by default the keys that describe the local process, like JUPYTERHUB_SERVICE_URL, whose
address only the site knows).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyterhub.objects import Server
from jupyterhub.spawner import Spawner
from jupyterhub.utils import url_path_join

from outpost_client.errors import InvalidArgument

DEFAULT_SITE_ENV_KEYS = (
    "JUPYTERHUB_SERVICE_URL",
    "JUPYTERHUB_SSL_KEYFILE",
    "JUPYTERHUB_SSL_CERTFILE",
    "JUPYTERHUB_SSL_CLIENT_CA",
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "CONDA_ROOT",
    "CONDA_DEFAULT_ENV",
)


# the hub's own internal_ssl file paths: never meaningful at the site
HUB_ONLY_ENV_KEYS = frozenset(
    {"JUPYTERHUB_SSL_KEYFILE", "JUPYTERHUB_SSL_CERTFILE", "JUPYTERHUB_SSL_CLIENT_CA"}
)


def escape_user_name(name: str) -> str:
    """A user name in a URL path, as JupyterHub's User.escaped_name quotes it."""
    from urllib.parse import quote

    return quote(name, safe="@~")


@dataclass
class StandInGroup:
    name: str


@dataclass
class StandInUser:
    """What a hosted Spawner sees as ``self.user``.

    ``name`` is the local account the site mapped the hub's user to (accounts.py): what
    the Spawner runs the notebook as. ``hub_name`` is the hub's own name of the user,
    which the notebook's URLs (``url``) and JUPYTERHUB_USER keep: jupyterhub-singleuser
    checks the hub's user against them.
    """

    name: str
    id: int = 0
    admin: bool = False
    groups: list[StandInGroup] = field(default_factory=list)
    url: str = ""
    hub_name: str = ""
    #: the user's auth_state the hub sent (None: none); never in repr, so never in a log
    auth_state: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.hub_name = self.hub_name or self.name

    async def get_auth_state(self) -> dict | None:
        """The user's auth_state, as JupyterHub's ``await user.get_auth_state()`` gives it
        (a fresh copy each call: what a Spawner changes in it is not kept)."""
        return copy.deepcopy(self.auth_state)

    @property
    def escaped_name(self) -> str:
        return escape_user_name(self.name)

    def progress_url(self, server_name: str = "") -> str:
        return url_path_join(self.url, server_name, "api/progress")


@dataclass
class StandInHub:
    """What a hosted Spawner sees as ``self.hub``."""

    api_url: str = "http://127.0.0.1:8081/hub/api"
    base_url: str = "/hub/"
    public_host: str = ""

    @property
    def url(self) -> str:
        return self.base_url


def stand_ins_from_env(
    env: dict[str, str],
    user_name: str,
    user_id: int,
    admin: bool,
    groups: list[str],
    account: str = "",
    auth_state: dict | None = None,
) -> tuple[StandInUser, StandInHub]:
    """Build the stand-in user and hub from the env the hub computed for the notebook;
    the user is named ``account`` (the local account; default: the hub's user_name) and
    carries the hub's ``auth_state`` (its ``get_auth_state()``)."""
    base = env.get("JUPYTERHUB_BASE_URL", "/") or "/"
    hub = StandInHub(
        api_url=env.get("JUPYTERHUB_API_URL", StandInHub.api_url),
        base_url=url_path_join(base, "hub/"),
        public_host=env.get("JUPYTERHUB_HOST", ""),
    )
    user = StandInUser(
        name=account or user_name,
        id=user_id,
        admin=admin,
        groups=[StandInGroup(g) for g in groups],
        url=url_path_join(base, "user", escape_user_name(user_name)) + "/",
        hub_name=user_name,
        auth_state=auth_state,
    )
    return user, hub


class StandInDatabase:
    """What a hosted Spawner gets as ``self.db``: the hub's database is not here.

    ``Spawner.db`` (the hub's shared session) is deprecated but still used: batchspawner
    calls ``self.db.commit()`` after recording its job id. What a Spawner keeps goes to
    the Outpost's own database through ``get_state()``; a commit here has nothing to do.
    """

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


class HostedSpawnerMixin:
    """Mixed in front of the configured Spawner class (see :func:`hosted_spawner_class`)."""

    _outpost_name: str = ""
    _outpost_hub_env: dict[str, str] = {}
    _outpost_site_env_keys: frozenset[str] = frozenset()
    # set by the hub API relay when it is on (HubAPIRelay.attach): env -> env
    _outpost_env_filter = None

    def __init__(self, *args, _outpost_name: str = "", **kwargs):
        # known before the Spawner's own __init__: KubeSpawner names the pod, PVC and secret
        # of a named server there, from self.name (tests/test_kubespawner_parity.py)
        self._outpost_name = _outpost_name
        super().__init__(*args, **kwargs)

    @property
    def name(self) -> str:  # Spawner.name reads the hub's ORM object; we have none
        return self._outpost_name

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        env.update(hub_user_env(env, self.user))
        site_keys = self._outpost_site_env_keys | set(self.environment)
        for key, value in self._outpost_hub_env.items():
            if key in HUB_ONLY_ENV_KEYS:
                continue  # paths on the hub's machine; the site's come from cert_paths
            if key not in site_keys or key not in env:
                env[key] = value
        if self._outpost_env_filter is not None:
            env = self._outpost_env_filter(env)
        return env


def hub_user_env(env: dict[str, str], user: StandInUser) -> dict[str, str]:
    """What Spawner.get_env() computed from the user's name, with the hub's name where the
    local account differs: the notebook talks to its hub as the hub's user (a hub that
    sends these keys overrides them anyway)."""
    local, hub_name = user.name, getattr(user, "hub_name", user.name)
    if local == hub_name:
        return {}
    fixed = {"JUPYTERHUB_USER": hub_name}
    activity = env.get("JUPYTERHUB_ACTIVITY_URL", "")
    suffix = f"/users/{escape_user_name(local)}/activity"
    if activity.endswith(suffix):
        fixed["JUPYTERHUB_ACTIVITY_URL"] = (
            activity[: -len(suffix)] + f"/users/{escape_user_name(hub_name)}/activity"
        )
    return fixed


def hub_user_scopes(spawner: Spawner) -> None:
    """Spawner's default oauth_access_scopes name self.user.name, the local account: the
    notebook's users are the hub's, so name the hub's user there (a site's own setting
    of the option stays)."""
    user = spawner.user
    local, hub_name = user.name, getattr(user, "hub_name", user.name)
    if local == hub_name:
        return

    def scopes(name: str) -> list[str]:
        return [f"access:servers!server={name}/{spawner.name}", f"access:servers!user={name}"]

    if list(spawner.oauth_access_scopes) == scopes(local):
        spawner.oauth_access_scopes = scopes(hub_name)


_hosted_classes: dict[type, type] = {}


def hosted_spawner_class(cls: type[Spawner]) -> type[Spawner]:
    """The hosted variant of a Spawner class (cached; same name, so its config applies)."""
    try:
        return _hosted_classes[cls]
    except KeyError:
        hosted = type(cls.__name__, (HostedSpawnerMixin, cls), {"__module__": cls.__module__})
        _hosted_classes[cls] = hosted
        return hosted


def make_spawner(
    spawner_class: type[Spawner],
    *,
    config,
    spawner_name: str,
    user: StandInUser,
    hub: StandInHub,
    env: dict[str, str],
    user_options: dict,
    site_env_keys: frozenset[str],
    overrides: dict[str, Any] | None = None,
    log=None,
) -> Spawner:
    """Create a hosted Spawner for one start."""
    cls = hosted_spawner_class(spawner_class)
    kwargs: dict[str, Any] = dict(
        user=user,
        hub=hub,
        config=config,
        orm_spawner=None,
        db=StandInDatabase(),
        api_token=env.get("JUPYTERHUB_API_TOKEN", ""),
        oauth_client_id=env.get("JUPYTERHUB_CLIENT_ID", ""),
        user_options=user_options,
        _outpost_name=spawner_name,
    )
    if log is not None:
        kwargs["log"] = RedactingLog(
            log, redacted_values(secrets_in_env(env), secrets_in_auth_state(user.auth_state))
        )
    spawner = cls(**kwargs)
    spawner._outpost_hub_env = dict(env)
    spawner._outpost_site_env_keys = frozenset(site_env_keys)
    hub_user_scopes(spawner)
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX") or user.url
    spawner._server = Server(base_url=prefix)
    if overrides:
        apply_overrides(spawner, overrides)
    return spawner


# env keys whose values never reach the Outpost's log (JUPYTERHUB_API_TOKEN, JPY_API_TOKEN,
# whatever a hub's custom_env adds under such a name)
SECRET_ENV_KEY = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE", re.IGNORECASE)
REDACTED = "[secret]"


def secrets_in_env(env: dict[str, str]) -> tuple[str, ...]:
    """The values in a start's env that must not be logged: those of keys named like a
    secret, 8 characters or longer (shorter ones would blot out ordinary words), longest
    first so that a secret containing another is hidden whole."""
    found = {v for k, v in env.items() if SECRET_ENV_KEY.search(k) and isinstance(v, str) and len(v) >= 8}
    return tuple(sorted(found, key=len, reverse=True))


def secrets_in_auth_state(auth_state: Any) -> tuple[str, ...]:
    """Every string in an auth_state (keys aside), 8 characters or longer: all of it is
    the user's credentials, and a Spawner that logs it must not put it in the log."""
    found: set[str] = set()
    stack = [auth_state]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if len(value) >= 8:
                found.add(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return tuple(found)


def redacted_values(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """The secrets of several sources as one tuple, longest first (a secret containing
    another is hidden whole)."""
    return tuple(sorted({s for group in groups for s in group}, key=len, reverse=True))


class RedactingLog(logging.LoggerAdapter):
    """A hosted Spawner's log, with its server's secrets replaced by ``[secret]``.

    Spawners log more than a hub's operators see: batchspawner logs the whole submit
    environment (the notebook's API token included) at DEBUG. A record is formatted here,
    redacted, and handed to the logger as plain text; tracebacks are passed on as they are.
    """

    def __init__(self, logger: logging.Logger, secrets: tuple[str, ...]):
        super().__init__(logger, {})
        self.secrets = secrets

    def log(self, level, msg, *args, **kwargs):
        if not self.isEnabledFor(level):
            return
        # formatted the way logging formats a record (a lone mapping is the %(key)s form)
        record = logging.LogRecord(self.logger.name, level, "", 0, msg, args, None)
        try:
            text = record.getMessage()
        except (TypeError, ValueError, KeyError):
            text = f"{msg} {args!r}"
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, "%s", text, **kwargs)

    def getChild(self, suffix: str) -> RedactingLog:  # noqa: N802 (logging's name)
        return RedactingLog(self.logger.getChild(suffix), self.secrets)


def apply_overrides(spawner: Spawner, overrides: dict[str, Any]) -> None:
    """Set trait values on this Spawner instance only (never on the shared config)."""
    traits = spawner.traits(config=True)
    for key, value in overrides.items():
        if key not in traits:
            raise InvalidArgument(
                f"config_overrides: {type(spawner).__name__} has no configurable option {key!r}",
                metadata={"field": f"config_overrides.{key}"},
            )
        try:
            setattr(spawner, key, value)
        except Exception as e:  # traitlets.TraitError and friends
            raise InvalidArgument(
                f"config_overrides.{key}: {e}", metadata={"field": f"config_overrides.{key}"}
            ) from None


async def maybe_await(value):
    if inspect.isawaitable(value):
        return await value
    return value


def normalise_address(result, spawner: Spawner) -> tuple[str, str, int]:
    """Turn what Spawner.start() returned into (scheme, host, port).

    Spawners return ``(ip, port)`` (the old contract) or a URL string; some return None
    and set ``self.ip``/``self.port``.
    """
    scheme = "https" if getattr(spawner, "internal_ssl", False) else "http"
    if isinstance(result, str):
        parsed = urlparse(result)
        if not parsed.hostname:
            raise ValueError(f"Spawner.start() returned a URL without a host: {result!r}")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return parsed.scheme or scheme, parsed.hostname, port
    if isinstance(result, (tuple, list)) and len(result) == 2:
        host, port = result
    elif result is None:
        host, port = spawner.ip, spawner.port
    else:
        raise ValueError(f"Spawner.start() returned {result!r}; expected (ip, port) or a URL")
    host = host or "127.0.0.1"
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError(f"Spawner.start() returned port {port}")
    return scheme, host, port


# --- internal_ssl: the hub's per-server certificates --------------------------------------

# StartSpec.certificates key -> (cert_paths key, file name)
CERT_FILES = {
    "key_pem": ("keyfile", "notebook.key"),
    "cert_pem": ("certfile", "notebook.crt"),
    "ca_pem": ("cafile", "notebooks-ca_trust.crt"),
}


#: the subdirectory of the Outpost's state_dir that holds internal_ssl files by default
CERTS_SUBDIR = "internal-ssl"


def default_certs_base(state_dir: str | Path | None = None) -> Path:
    """Where internal_ssl files go when certs_dir is not set: internal-ssl in the Outpost's
    own state directory (None: the working directory), as an absolute path.

    Not a fixed name under /tmp: there any local user could create it first (a directory
    of theirs, or a symlink), and every start with internal_ssl would fail.
    """
    return Path(os.path.abspath(state_dir or os.getcwd())) / CERTS_SUBDIR


def certs_base_warning(base: str | Path) -> str:
    """A warning for the log when base is in a directory every local user may write to
    (like /tmp): one could take its name first, and starts with internal_ssl would fail."""
    parent = Path(base).parent
    try:
        others_write = os.stat(parent).st_mode & 0o002
    except OSError:
        return ""
    if not others_write:
        return ""
    return (
        f"The internal_ssl certificates go to {base}, in {parent}, which every local user may "
        "write to: one could take that name first (the Outpost then refuses to write "
        "certificates there). Set c.Outpost.state_dir (or certs_dir) to a directory of the "
        "Outpost's own."
    )


def _is_private_dir(path: Path) -> bool:
    """Whether path is a directory (not a symlink) of this process's uid, mode 0700."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _private_dir(path: Path) -> None:
    """Create path (mode 0700) or check that the existing one is ours and private."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if not _is_private_dir(path):
        raise PermissionError(
            f"The Outpost's directory for internal_ssl certificates, {path}, must be a "
            f"directory of uid {os.getuid()} with mode 0700, not a symlink (refusing to write "
            "certificates there); the site's administrators must remove or fix it."
        )


def certs_location(
    hub: str, server_name: str, start_id: str, base: str | Path | None = None
) -> tuple[Path, str]:
    """(base directory, name) where the Outpost writes one start's internal_ssl files.

    Derived from (hub, server_name, start_id) only, so a restarted Outpost finds (and
    removes) the files of a start it knows from its database, which never holds them.
    """
    digest = hashlib.sha256(f"{hub}\0{server_name}\0{start_id}".encode()).hexdigest()[:32]
    return (Path(base) if base else default_certs_base()), digest


def write_certificates(certs: dict[str, str], base: Path, name: str) -> dict[str, str]:
    """Write the three PEMs into base/name (0700; files 0600); return cert_paths."""
    _private_dir(base)
    directory = base / name
    shutil.rmtree(directory, ignore_errors=True)  # a leftover of an interrupted start
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)  # whatever the umask
    paths = {}
    for pem_key, (path_key, file_name) in CERT_FILES.items():
        path = directory / file_name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(certs[pem_key])
        paths[path_key] = str(path)
    return paths


def remove_certificates(base: Path, name: str) -> bool:
    """Remove what write_certificates wrote (True if there was something)."""
    directory = base / name
    if not _is_private_dir(base) or not os.path.lexists(directory):
        return False  # nothing of ours (never follow someone else's directory or symlink)
    shutil.rmtree(directory, ignore_errors=True)
    return True


async def install_certificates(spawner: Spawner, certs: dict[str, str], base: Path, name: str) -> dict:
    """What JupyterHub does before Spawner.start() with internal_ssl, on the site's side.

    The hub already made the certificates (create_certs): write them, hand them to the
    Spawner's move_certs() (sync or async; where it copies them is its business) and use
    its answer as cert_paths, so get_env() sets JUPYTERHUB_SSL_*; internal_ssl makes the
    address (and JUPYTERHUB_SERVICE_URL) https.
    """
    spawner.internal_ssl = True
    paths = write_certificates(certs, base, name)
    # JupyterHub gives every Spawner its trust bundles by component; Spawners that ship the
    # certificates to the notebook themselves read them (KubeSpawner's secret appends
    # "hub-ca" to the notebook's CA file). The site has one bundle, the notebooks' trust
    # bundle the hub sent: the CAs the notebook needs to verify the hub and the proxy
    bundle = paths["cafile"]
    spawner.internal_trust_bundles = {
        "notebooks-ca": bundle,
        "hub-ca": bundle,
        **(spawner.internal_trust_bundles or {}),
    }
    moved = await maybe_await(spawner.move_certs(dict(paths)))
    spawner.cert_paths = dict(moved or paths)
    return spawner.cert_paths
