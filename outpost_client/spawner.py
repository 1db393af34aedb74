"""OutpostSpawner: the JupyterHub Spawner that starts servers through Outposts.

Configure it in jupyterhub_config.py::

    c.JupyterHub.spawner_class = "outpost"
    c.OutpostSpawner.outpost_address = "hpc-outpost.example.org:50051"
    c.OutpostSpawner.ssh_host = "hpc-outpost.example.org"     # tunnel to the notebooks
    c.OutpostSpawner.ssh_key = "/srv/jupyterhub/outpost_ed25519"
    c.OutpostSpawner.ssh_known_hosts = "/srv/jupyterhub/outpost_known_hosts"
    c.OutpostSpawner.hub_api_forward = True                   # site cannot reach the hub
    c.OutpostSpawner.hub_api_site_port = 18081

or with several Outposts, one chosen per server (see ``outposts``).

``start()`` sends Start with the env the hub computed, follows the Outpost's Events (they
are this Spawner's ``progress()``, so the spawn page shows the remote Spawner's own
messages), opens an SSH forward to the notebook when it is ready and returns the local
URL. ``poll()`` and ``stop()`` call the Outpost; ``get_state()`` keeps what a restarted
hub needs to find the same notebook again through a tunnel on the same local port.

An Outpost's options are :mod:`outpost_client.outposts`' (one table); the client, poller
and tunnel the hub holds open to it are :mod:`outpost_client.registry`'s.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
import re
import uuid
from dataclasses import dataclass, field

import grpc
from jupyterhub.spawner import Spawner
from jupyterhub.utils import exponential_backoff
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Dict, Float, Integer, List, Unicode, default, observe

from . import form, reconcile
from .client import OutpostClient
from .errors import DeadlineExceeded, OutpostError, ServerNotFound, Unavailable
from .outposts import TRAIT_NAMES, DefaultOutpostTraits, OutpostConfig, default_config, outposts_help
from .registry import REGISTRY, OutpostResources
from .v1 import outpost_pb2 as pb

# what the Outpost takes as a server name (outpost_server/validation.py)
SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}")
_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@+")
_HEX = frozenset("0123456789abcdef")
# a name that starts with no letter or digit, or with x...x and then none, gets an "x" in
# front (the Outpost wants a letter or digit first): so a name that starts with x...x and
# then no letter or digit always had one added, and removing it gives the name back
_NEEDS_X = re.compile(r"x*[^A-Za-z0-9]")

# the Outposts (name, address) this hub process has warned about once: send_auth_state is
# set but the channel is plaintext, so auth_state is not sent
_warned_auth_state_in_clear: set[tuple[str, str]] = set()

# with internal_ssl: the notebook's cert files on the hub's machine (not sent; see move_certs)
_HUB_SSL_ENV_KEYS = ("JUPYTERHUB_SSL_KEYFILE", "JUPYTERHUB_SSL_CERTFILE", "JUPYTERHUB_SSL_CLIENT_CA")


def _hex_escape(char: str) -> str:
    return "".join(f"_{b:02x}" for b in char.encode())


def escape_name_field(text: str) -> str:
    """One field of a remote server name (a user name, a server name), made of the
    characters the Outpost allows, such that the field can be read back and never runs
    into the next one.

    - letters, digits, ``.``, ``@``, ``+`` stay;
    - ``-`` stays, except at either end or next to another ``-``: so a field never holds
      ``--`` (the template's separator) nor starts or ends with ``-``;
    - ``_`` stays unless what follows it in the result are two lower-case hex digits (or
      nothing: the next field's start is not known here);
    - everything else, and the exceptions above, becomes ``_xx`` per UTF-8 byte.

    Reading back: ``_`` and two lower-case hex digits is always an escaped byte, any other
    ``_`` is itself. Names made only of the first kind of characters (and single ``-`` or
    ``_``) are as they were before this escaping was made injective.
    """
    tail = ""  # the result from position i on (built right to left: a "_" depends on it)
    last = len(text) - 1
    for i in range(last, -1, -1):
        char = text[i]
        if char in _KEPT:
            piece = char
        elif char == "-":
            lone = 0 < i < last and text[i - 1] != "-" and text[i + 1] != "-"
            piece = "-" if lone else "_2d"
        elif char == "_":
            ambiguous = i == last or (len(tail) >= 2 and tail[0] in _HEX and tail[1] in _HEX)
            piece = "_5f" if ambiguous else "_"
        else:
            piece = _hex_escape(char)
        tail = piece + tail
    return tail


def remote_server_name(template: str, username: str, servername: str) -> str:
    """The Outpost-side server name of a user's server: ``template`` with the escaped
    user name and server name (:func:`escape_name_field`).

    Injective for a template that separates ``{username}`` and ``{servername}`` with
    ``--`` (the default ``{username}--{servername}``): neither field can hold ``--``, so
    user ``a`` with server ``b`` (``a--b``) and user ``a--b`` (``a_2d_2db``) never share a
    name. For the default server (empty servername) a trailing ``--`` is dropped. A name
    not starting with a letter or digit gets an ``x`` in front (see ``_NEEDS_X``).
    ValueError if the result is longer than the Outpost's 255 characters (a name is
    never cut short: two names cut to the same prefix would be one server) or the
    template itself has characters the Outpost does not allow.
    """
    name = template.format(username=escape_name_field(username), servername=escape_name_field(servername))
    if not servername and name.endswith("--"):
        name = name[:-2]
    if _NEEDS_X.match(name):
        name = "x" + name
    if len(name) > 255:
        raise ValueError(
            f"The server's name at the Outpost would be {len(name)} characters long, and at most 255 "
            "are allowed: choose a shorter server name."
        )
    if not SERVER_NAME_RE.fullmatch(name):
        raise ValueError(
            f"OutpostSpawner.server_name_template {template!r} makes {name[:64]!r}, which has characters "
            "the Outpost does not allow (letters, digits and . _ @ + - only)."
        )
    return name


def adopt_hub_logging(hub_log) -> None:
    """Send the client's own loggers ("outpost.*", e.g. the tunnel's) to the hub's log."""
    import logging

    logger = logging.getLogger("outpost")
    if getattr(logger, "_outpost_adopted", False) or not getattr(hub_log, "handlers", None):
        return
    logger.handlers = list(hub_log.handlers)
    logger.setLevel(hub_log.getEffectiveLevel())
    logger.propagate = False
    logger._outpost_adopted = True


async def _maybe_await(value):
    if inspect.isawaitable(value):
        return await value
    return value


def safe_html(html: str) -> str:
    """An Outpost's html_message as the spawn page may render it: JupyterHub puts it in
    the page as HTML, so what a site (or a notebook user's doing there) writes must not
    run in the hub's origin. nh3 keeps text formatting and links, drops scripts, event
    handlers, styles and javascript: URLs."""
    import nh3

    return nh3.clean(html)


def _flavor_form(spawner) -> object:
    """OutpostSpawner's default options_form (JupyterHub calls it with the spawner)."""
    return spawner.flavor_options_form()


class OutpostStartFailed(Exception):
    """The Outpost's Spawner failed; the message is meant for the user, and so is the end
    of the notebook's output (``output_tail``) if the Outpost sent it: JupyterHub shows
    ``jupyterhub_message`` (text) or ``jupyterhub_html_message`` on the spawn page."""

    def __init__(self, message: str, output_tail: str = ""):
        super().__init__(message)
        self.output_tail = output_tail
        self.jupyterhub_message = message
        if output_tail:
            self.jupyterhub_message = f"{message}\n\n{OUTPUT_TAIL_TITLE}\n{output_tail}"
            self.jupyterhub_html_message = output_tail_html(message, output_tail)


#: what the spawn page says above the end of a notebook's output
OUTPUT_TAIL_TITLE = "The last output of your server:"


def output_tail_html(message: str, output_tail: str) -> str:
    """message and the notebook's output as the spawn page shows them: both escaped (the
    output is the notebook user's writing, never HTML), the output as preformatted text."""
    return (
        f"<p>{html.escape(message)}</p><p>{html.escape(OUTPUT_TAIL_TITLE)}</p>"
        f'<pre style="white-space: pre-wrap; max-height: 30em; overflow: auto">{html.escape(output_tail)}</pre>'
    )


@dataclass
class _Progress:
    events: list[dict] = field(default_factory=list)
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: dict) -> None:
        self.events.append(event)
        self.changed.set()

    def finish(self) -> None:
        self.done = True
        self.changed.set()


class OutpostSpawner(Spawner, DefaultOutpostTraits):
    """Start single-user servers on a remote system, through a JupyterHub Outpost."""

    # --- where the Outpost is ---------------------------------------------------------
    # The default Outpost's options (outpost_address, outpost_ca, ..., ssh_host, ...) are
    # inherited from DefaultOutpostTraits: one per OutpostConfig field (outposts.py).

    outpost_timeout = Float(30.0, min=0.01, config=True, help="Deadline in seconds of each call to the Outpost (not of the whole start).")
    outpost_retry_timeout = Float(
        60.0,
        min=0.1,
        config=True,
        help="""Seconds Start and Stop keep retrying while the Outpost is unavailable. A
        Stop that gives up leaves the server at the site, and JupyterHub forgets it: the
        Outpost reconciler (OutpostReconciler) stops it there later.""",
    )
    poll_batch_window = Float(
        0.2,
        min=0,
        config=True,
        help="""Seconds a poll waits for the polls of other servers on the same Outpost,
        so that one BatchPoll call answers them all (one shared poller per Outpost).
        0: every poll is its own call.""",
    )

    tunnel_listen_host = Unicode(
        "127.0.0.1",
        config=True,
        help="""Address of the hub's host where each notebook's tunnel listens (one port per
        notebook). 127.0.0.1 while the proxy runs on the hub's host. If the proxy runs
        elsewhere (Kubernetes: its own pod), an address of the hub's the proxy can reach, or
        0.0.0.0 together with tunnel_connect_host. Whoever reaches it reaches the notebook's
        port, as on a cluster without tunnels; the notebook still requires its login.""",
    )
    tunnel_connect_host = Unicode(
        "",
        config=True,
        help="""Host in the URL the hub and the proxy use for a notebook's tunnel, e.g. a
        headless Service that selects the hub pod when tunnel_listen_host is 0.0.0.0. The
        hub stores the URL, so the name must survive hub restarts (a pod IP does not).
        Empty: tunnel_listen_host itself. With internal_ssl, a name other than 127.0.0.1
        or localhost goes in c.Spawner.ssl_alt_names.""",
    )

    outposts = Dict(config=True, help=outposts_help())
    outpost_chooser = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""Callable (spawner) -> Outpost name, sync or async. Default: the user_options
        key "outpost" if given, else the named server's name if an Outpost has that name,
        else "default". The "outpost" key is not sent to the Outpost.""",
    )

    # --- the spawn form ----------------------------------------------------------------------

    form_outposts = List(
        Unicode(),
        config=True,
        help="""The Outposts the spawn form offers, in this order (names: "default" and
        the keys of `outposts`). Empty: "default" first, then every entry of `outposts`.
        Set it when the "default" Outpost is not one users should pick. A named server
        whose name is an Outpost's (and no outpost_chooser) is offered only that one.""",
    )
    outpost_display_names = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""What the spawn form calls each Outpost (name -> label, e.g. {"default":
        "HPC cluster", "gpu": "GPU cloud"}); an Outpost not listed is shown by its name.""",
    )
    form_timeout = Float(
        5.0,
        min=0.1,
        max=60,
        config=True,
        help="""Deadline in seconds of each Outpost's ListFlavors while the spawn form is
        made (they are asked at once). An Outpost that does not answer in time is shown as
        not reachable now, and the others can still be chosen.""",
    )

    @default("options_form")
    def _options_form_default(self):
        # a callable: JupyterHub calls it (and awaits it) each time it shows the form
        return _flavor_form

    @default("options_from_form")
    def _options_from_form_default(self):
        return self._flavor_options_from_form

    def _form_outpost_names(self) -> list[str]:
        """The Outposts the form offers (see form_outposts)."""
        configs = self._outpost_configs()
        if self.outpost_chooser is None and self.name and self.name in configs:
            return [self.name]  # a named server that names its Outpost
        names = list(self.form_outposts) or ["default", *(n for n in self.outposts if n != "default")]
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise web.HTTPError(500, f"OutpostSpawner.form_outposts names no configured Outpost: {unknown}")
        return names

    async def _system_choice(self, name: str) -> form.SystemChoice:
        """One Outpost for the form: its flavors for this user, now (ListFlavors)."""
        label = self.outpost_display_names.get(name, name)
        client = REGISTRY.get(self._outpost_configs()[name]).client(self.outpost_timeout)
        try:
            answer = await client.list_flavors(
                self.user.name,
                groups=[g.name for g in getattr(self.user, "groups", [])],
                admin=bool(getattr(self.user, "admin", False)),
                user_id=getattr(self.user, "id", 0) or 0,
                timeout=self.form_timeout,
            )
        except OutpostError as e:
            if e.code == grpc.StatusCode.UNIMPLEMENTED:
                return form.SystemChoice(name, label)  # an Outpost from before flavors
            self.log.warning("ListFlavors at Outpost %s for %s failed: %s", name, self.user.name, e)
            return form.SystemChoice(name, label, error="This system cannot be reached now; try again later.")
        return form.SystemChoice(
            name, label, flavors=list(answer.flavors), default_flavor=answer.default_flavor,
            user_max_total=answer.user_max_total, user_in_use_total=answer.user_in_use_total,
        )  # fmt: skip

    async def flavor_options_form(self) -> str:
        """The generated spawn form: every offered Outpost and its flavors, asked now.
        Empty (no form: JupyterHub starts at once) for one Outpost without flavors."""
        systems = await asyncio.gather(*(self._system_choice(n) for n in self._form_outpost_names()))
        if not form.needs_form(systems):
            return ""
        return form.render_form(systems, form.pick(systems, self.user_options or {}))

    def _flavor_options_from_form(self, form_data):
        return form.options_from_form(form_data, self._form_outpost_names())

    # --- what is sent -----------------------------------------------------------------------

    server_name_template = Unicode(
        "{username}--{servername}",
        config=True,
        help="""The server's name at the Outpost. {username}, {servername} (empty for the
        default server: a trailing "--" is dropped), each escaped so that no two users'
        servers share a name: characters outside [A-Za-z0-9._@+-], a "-" next to another
        or at either end, and a "_" that would read as an escape become _xx (their UTF-8
        bytes in hex). Keep "--" between the two fields: they never contain it. A server
        keeps the name it was started with (hub state) when this changes.""",
    )
    custom_env = AnyTrait(
        None, allow_none=True, config=True,
        help="Callable (spawner, env) -> env, sync or async: change the env sent to the Outpost.",
    )
    custom_user_options = AnyTrait(
        None, allow_none=True, config=True,
        help="Callable (spawner, user_options) -> user_options, sync or async.",
    )
    config_overrides = AnyTrait(
        None, allow_none=True, config=True,
        help="""Overrides of the remote Spawner's config for a start (e.g. {"image": ...}): a
        dict, or a callable (spawner) -> dict, sync or async. The Outpost applies only what
        its allow_override policy allows.""",
    )
    auth_state_filter = AnyTrait(
        None, allow_none=True, config=True,
        help="""Callable (spawner, auth_state) -> auth_state, sync or async: what of the
        user's auth_state is sent to the Outpost, with send_auth_state (e.g. only the access
        token; spawner.outpost_name says which Outpost). A dict (JSON values), or None to
        send none. Raising fails the start.""",
    )
    check_allowed = AnyTrait(
        None, allow_none=True, config=True,
        help="""Callable (spawner, user_options) -> bool, sync or async, run before a start.
        False (or raising) refuses the start with a 403 and the hook's message.""",
    )

    @default("env_keep")
    def _env_keep_default(self):
        return []  # the hub's PATH, virtualenv etc. mean nothing at the remote site

    # --- state ------------------------------------------------------------------------------

    outpost_name = Unicode("")
    remote_name = Unicode("")
    start_id = Unicode("")
    remote_scheme = Unicode("")
    remote_host = Unicode("")
    remote_port = Integer(0)
    local_port = Integer(0)

    def get_state(self):
        state = super().get_state()
        if self.start_id:
            state.update(
                outpost_name=self.outpost_name,
                remote_name=self.remote_name,
                start_id=self.start_id,
                remote_scheme=self.remote_scheme,
                remote_host=self.remote_host,
                remote_port=self.remote_port,
                local_port=self.local_port,
            )
        return state

    def load_state(self, state):
        super().load_state(state)
        for key in ("outpost_name", "remote_name", "start_id", "remote_scheme", "remote_host"):
            if key in state:
                setattr(self, key, state[key] or "")
        for key in ("remote_port", "local_port"):
            if key in state:
                setattr(self, key, int(state[key] or 0))

    def clear_state(self):
        super().clear_state()
        self.outpost_name = self.remote_name = self.start_id = ""
        self.remote_scheme = self.remote_host = ""
        self.remote_port = self.local_port = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # the first OutpostSpawner of a running hub starts the Outposts' reconcilers
        reconcile.start_reconcilers(self)

    # --- helpers ----------------------------------------------------------------------------

    _configs_cache: dict[str, OutpostConfig] | None = None

    @observe("outposts", *TRAIT_NAMES)
    def _forget_configs(self, change) -> None:
        self._configs_cache = None

    def _outpost_configs(self) -> dict[str, OutpostConfig]:
        """The Outposts this Spawner may use, by name (built once; every poll needs it)."""
        if self._configs_cache is None:
            self._configs_cache = self._build_outpost_configs()
        return self._configs_cache

    def _build_outpost_configs(self) -> dict[str, OutpostConfig]:
        configs = {"default": default_config(self)}
        for name, data in self.outposts.items():
            configs[name] = OutpostConfig.from_dict(name, dict(data))
        return configs

    async def _choose_outpost(self) -> str:
        configs = self._outpost_configs()
        if self.outpost_chooser is not None:
            name = await _maybe_await(self.outpost_chooser(self))
        elif self.user_options.get("outpost"):
            name = str(self.user_options["outpost"])
        elif self.name and self.name in configs:
            name = self.name
        else:
            name = "default"
        if name not in configs:
            raise web.HTTPError(400, f"No Outpost named {name!r} is configured.")
        return name

    @property
    def outpost(self) -> OutpostConfig:
        return self._outpost_configs()[self.outpost_name or "default"]

    @property
    def _resources(self) -> OutpostResources:
        """What the hub holds open to this server's Outpost, shared (registry.py)."""
        return REGISTRY.get(self.outpost)

    @property
    def client(self) -> OutpostClient:
        return self._resources.client(self.outpost_timeout)

    def _tunnel(self):
        adopt_hub_logging(self.log)
        return self._resources.tunnel(self.hub.api_url)

    async def _retry(self, what: str, call, timeout: float | None = None):
        """Call an idempotent RPC, retrying while the Outpost is unavailable (for
        ``timeout`` seconds, default outpost_retry_timeout)."""
        result = {}
        if timeout is None:
            timeout = self.outpost_retry_timeout

        async def attempt():
            try:
                result["value"] = await call()
                return True
            except (Unavailable, DeadlineExceeded) as e:
                self.log.warning("%s for %s: %s; retrying", what, self._log_name, e)
                return False

        await exponential_backoff(attempt, f"{what} for {self._log_name} did not succeed", timeout=timeout)
        return result["value"]

    # --- internal_ssl ---------------------------------------------------------------------------

    _internal_ssl_pems: dict[str, str] | None = None

    async def move_certs(self, paths):
        """JupyterHub made this server's certificates (create_certs) on the hub's machine:
        read them into memory, to travel to the Outpost in Start (StartRequest.internal_ssl).

        The paths are returned unchanged (the hub and proxy use the CA files; the Outpost
        writes the notebook's copies at the site and sets the notebook's JUPYTERHUB_SSL_*).
        """

        def read(path: str) -> str:
            with open(path) as f:
                return f.read()

        self._internal_ssl_pems = {
            "key_pem": read(paths["keyfile"]),
            "cert_pem": read(paths["certfile"]),
            "ca_pem": read(paths["cafile"]),
        }
        return paths

    def _internal_ssl_certificates(self) -> dict[str, str] | None:
        """What Start carries in internal_ssl (None without internal_ssl)."""
        if not self.internal_ssl:
            return None
        if not self._internal_ssl_pems:
            raise web.HTTPError(
                500, "internal_ssl is on, but JupyterHub passed no certificates to move_certs()"
            )
        return self._internal_ssl_pems

    # --- the Spawner API ----------------------------------------------------------------------

    async def start(self):
        self.outpost_name = await self._choose_outpost()
        config = self.outpost
        if config.ssh_host:
            self._tunnel_connect_host()  # a configuration error fails before anything starts
        if self.check_allowed is not None:
            try:
                allowed = await _maybe_await(self.check_allowed(self, dict(self.user_options)))
            except web.HTTPError:
                raise
            except Exception as e:
                raise web.HTTPError(403, str(e)) from None
            if not allowed:
                raise web.HTTPError(403, "This server may not be started with these options.")
        flavor = self.user_options.get("flavor") or ""
        if not isinstance(flavor, str) or (flavor and not form.FLAVOR_NAME_RE.fullmatch(flavor)):
            raise form.refusal("The flavor must be the name of one the Outpost offers.")
        # computed for a new start only: a running server keeps the name in its state
        # (get_state/load_state), whichever way the hub named servers when it started it
        try:
            self.remote_name = remote_server_name(self.server_name_template, self.user.name, self.name)
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.start_id = uuid.uuid4().hex
        if config.ssh_host and config.hub_api_forward:
            # the notebook reaches the hub API at the site-side end of the reverse forward
            scheme = "https" if self.internal_ssl else "http"  # the hub's own API scheme
            self.hub_connect_url = f"{scheme}://{config.hub_api_site_host}:{config.hub_api_site_port}"
        env = self.get_env()
        internal_ssl = self._internal_ssl_certificates()
        for key in _HUB_SSL_ENV_KEYS:
            env.pop(key, None)  # paths on the hub's machine; the Outpost sets the site's
        if self.custom_env is not None:
            env = await _maybe_await(self.custom_env(self, env))
        user_options = dict(self.user_options)
        user_options.pop("outpost", None)  # the hub's choice of Outpost, not the site's business
        user_options.pop("flavor", None)  # travels as Start's own field (see above)
        if self.custom_user_options is not None:
            user_options = await _maybe_await(self.custom_user_options(self, user_options))
        overrides = self.config_overrides
        if callable(overrides):
            overrides = await _maybe_await(overrides(self))
        auth_state = await self._auth_state_to_send(config)
        self._progress = _Progress()
        if self.stop_message:  # why the last server ended, before this start's events
            self._progress.add({"message": self.stop_message})
            self.stop_message = ""
        if self.last_output_tail:  # the last words of the server that exited last
            message = "Your previous server exited."
            self._progress.add({
                "message": f"{message} {OUTPUT_TAIL_TITLE}\n{self.last_output_tail}",
                "html_message": output_tail_html(message, self.last_output_tail),
            })  # fmt: skip
            self.last_output_tail = ""
        client = self.client
        # the SSH connection (and the hub API's reverse forward) before the notebook starts:
        # it reaches the hub API while it starts, and the Outpost waits for it to answer
        # (readiness_check) before READY. A connection that can never work (host key,
        # login refused) ends the start at once (_follow_events_or_unreachable); other
        # errors surface in _connect(), which tries again
        connecting: asyncio.Future | None = None
        if config.ssh_host:
            tunnel = self._tunnel()
            connect = getattr(tunnel, "connect", None)
            if connect is not None and not getattr(tunnel, "connected", False):
                connecting = asyncio.ensure_future(connect())
                connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await self._start_or_forget(
                lambda: client.start(
                    self.remote_name,
                    self.start_id,
                    user_name=self.user.name,
                    user_id=getattr(self.user, "id", 0) or 0,
                    admin=bool(getattr(self.user, "admin", False)),
                    groups=[g.name for g in getattr(self.user, "groups", [])],
                    env=env,
                    user_options=user_options,
                    config_overrides=overrides or None,
                    spawner_name=self.name,
                    internal_ssl=internal_ssl,
                    flavor=flavor,
                    auth_state=auth_state,
                ),
            )
            self._internal_ssl_pems = None  # sent; the Outpost has them now
            address = await self._follow_events_or_unreachable(client, connecting)
            self.remote_scheme, self.remote_host, self.remote_port = address.scheme, address.host, address.port
            if self.internal_ssl and self.remote_scheme != "https":
                self.log.warning(
                    "internal_ssl is on, but the Outpost reports %s at %s://...; the hub "
                    "expects https", self._log_name, self.remote_scheme,
                )
            url = await self._connect()
        except OutpostError as e:
            raise OutpostStartFailed(e.message) from None
        finally:
            self._progress.finish()
        return url

    async def _auth_state_to_send(self, config: OutpostConfig) -> dict | None:
        """The user's auth_state for Start: only with send_auth_state, only over TLS (over
        plaintext: nothing, and a warning once per Outpost), after auth_state_filter.
        Never logged."""
        if not config.send_auth_state:
            return None
        if config.tls is None:
            key = (self.outpost_name, config.address)
            if key not in _warned_auth_state_in_clear:
                _warned_auth_state_in_clear.add(key)
                self.log.warning(
                    "send_auth_state is set for Outpost %s (%s), but the channel to it is plaintext "
                    "(no outpost_ca): auth_state is not sent to it (warned once)",
                    self.outpost_name, config.address,
                )  # fmt: skip
            return None
        auth_state = await self.user.get_auth_state()
        if self.auth_state_filter is not None and auth_state is not None:
            try:
                auth_state = await _maybe_await(self.auth_state_filter(self, auth_state))
            except Exception as e:
                # not the message: it may quote the auth_state
                self.log.error("OutpostSpawner.auth_state_filter raised %s for %s", type(e).__name__, self._log_name)
                raise web.HTTPError(500, "The hub could not prepare this start (auth_state_filter failed).") from None
        if auth_state is None:
            return None
        if not isinstance(auth_state, dict):
            raise web.HTTPError(
                500, f"auth_state for the Outpost must be a dict or None, not {type(auth_state).__name__} (auth_state_filter)"
            )
        try:
            json.dumps(auth_state, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise web.HTTPError(500, f"auth_state for the Outpost must hold JSON values only: {type(e).__name__}") from None
        return auth_state

    async def _start_or_forget(self, call) -> None:
        """Start, retrying while the Outpost is unavailable. A refusal (bad request,
        override not allowed, name taken, too many starts) means the Outpost holds
        nothing of this start, so the start id is forgotten.

        That matters to the user: after a failed start JupyterHub polls the server
        before it clears the spawn, and its progress page answers 400 ("not starting")
        instead of the reason to anyone who asks meanwhile. Without a start id, poll()
        answers at once, without a call (or a batch window) to wait for.
        """
        try:
            await self._retry("Start", call)
        except OutpostError:
            self.start_id = ""
            raise

    async def _follow_events_or_unreachable(
        self, client: OutpostClient, connecting: asyncio.Future | None
    ) -> pb.ServerAddress:
        """_follow_events, unless the hub's SSH connection fails for good first (the site's
        host key is not the one the hub knows, the login is refused): then the notebook
        could never be reached and would wait for its hub API in vain, so it is stopped at
        the Outpost now and the start fails with the reason."""
        follow = asyncio.ensure_future(self._follow_events(client))
        try:
            if connecting is not None:
                await asyncio.wait({follow, connecting}, return_when=asyncio.FIRST_COMPLETED)
                error = None if not connecting.done() or connecting.cancelled() else connecting.exception()
                if not follow.done() and getattr(error, "permanent", False):
                    follow.cancel()
                    await asyncio.gather(follow, return_exceptions=True)
                    await self._stop_unreachable(error)
                    raise error
            return await follow
        finally:
            follow.cancel()

    async def _follow_events(self, client: OutpostClient) -> pb.ServerAddress:
        """Follow the start's events to its terminal event, resuming after drops."""
        after = 0
        delay = 0.2
        while True:
            try:
                async for event in client.events(self.remote_name, start_id=self.start_id, after_sequence=after):
                    after = event.sequence
                    delay = 0.2
                    if event.kind == pb.EVENT_KIND_READY:
                        return event.address
                    if event.kind == pb.EVENT_KIND_FAILED:
                        self.log.warning("Outpost start of %s failed: %s (%s)", self._log_name, event.message, event.error_class)
                        if event.output_tail:
                            self._log_output_tail(event.output_tail)
                        self.start_id = ""  # the Outpost has already cleaned up after it
                        raise OutpostStartFailed(event.message, event.output_tail)
                    item = {"message": event.message}
                    if event.HasField("progress"):
                        item["progress"] = event.progress
                    if event.html_message:
                        item["html_message"] = safe_html(event.html_message)
                    self._progress.add(item)
                # the stream ended without a terminal event: the start was stopped
                raise OutpostStartFailed("The server was stopped while it was starting.")
            except (Unavailable, DeadlineExceeded) as e:
                self.log.warning("Events of %s interrupted (%s); resuming after %d", self._log_name, e, after)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    def _tunnel_connect_host(self) -> str:
        """The host in a tunnelled notebook's URL (a configuration error if there is none)."""
        host = self.tunnel_connect_host or self.tunnel_listen_host
        if host in ("", "0.0.0.0", "::"):
            raise ValueError(
                f"OutpostSpawner.tunnel_listen_host is {self.tunnel_listen_host!r}, which the proxy "
                "cannot connect to: set OutpostSpawner.tunnel_connect_host to an address of the "
                "hub's host the proxy can reach."
            )
        return f"[{host}]" if ":" in host else host

    async def _connect(self) -> str:
        """The URL the hub (and proxy) reach the notebook at: through the tunnel if any."""
        tunnel = self._tunnel()
        if tunnel is None:
            return f"{self.remote_scheme}://{self.remote_host}:{self.remote_port}"
        try:
            self.local_port = await tunnel.forward(
                self.remote_name, self.remote_host, self.remote_port,
                local_port=self.local_port, listen_host=self.tunnel_listen_host,
            )
        except Exception as e:
            await self._stop_unreachable(e)
            raise
        return f"{self.remote_scheme}://{self._tunnel_connect_host()}:{self.local_port}"

    async def _stop_unreachable(self, error: Exception) -> None:
        """The notebook runs at the site, but the hub cannot reach it: stop it now and,
        once stopped, forget the start (as after a refusal, see _start_or_forget). If the
        Outpost cannot be told now, JupyterHub's own stop after the failure tries again."""
        self.log.warning("No tunnel to %s (%s); stopping it at the Outpost", self._log_name, error)
        try:
            await self.client.stop(self.remote_name, self.start_id)
        except OutpostError as e:
            self.log.warning("Could not stop %s yet: %s", self._log_name, e)
            return
        self.start_id = ""

    async def progress(self):
        progress = getattr(self, "_progress", None)
        if progress is None:
            return
        sent = 0
        while True:
            while sent < len(progress.events):
                yield progress.events[sent]
                sent += 1
            if progress.done:
                return
            progress.changed.clear()
            await progress.changed.wait()

    async def poll(self):
        if not self.start_id:
            return 0
        try:
            if self.poll_batch_window > 0:
                poller = self._resources.poller(self.outpost_timeout, self.poll_batch_window)
                status = await poller.status(self.remote_name)
            else:
                status = await self.client.poll(self.remote_name)
        except ServerNotFound:
            return 0
        except OutpostError as e:
            # the Outpost is unreachable or restarting: that says nothing about the notebook
            self.log.warning("Poll of %s failed (%s); assuming it still runs", self._log_name, e)
            return None
        if status.start_id != self.start_id:
            return 0  # our start is gone; another one has the name now
        if status.state == pb.SERVER_STATE_STOPPED:
            if status.stop_message:
                self._outpost_stopped(status.stop_message)
            await self._output_tail_of_stopped(status)
            return status.exit_code if status.HasField("exit_code") else 0
        if status.state == pb.SERVER_STATE_RUNNING and self.local_port:
            await self._restore_tunnel()
        return None

    #: why the Outpost last stopped this server on its own (its runtime ended), until the
    #: next start shows it to the user as its first progress message
    stop_message = Unicode("")
    #: the end of the output of the server that exited last, likewise until the next start
    last_output_tail = Unicode("")
    #: the start whose output tail was asked for already (one Poll per exit, not per poll)
    _tail_of_start = ""

    async def _output_tail_of_stopped(self, status: pb.ServerStatus) -> None:
        """A stopped server's last words: to the hub's log (WARNING) and the next start's
        spawn page. BatchPoll never carries them (it stays small), so a stop seen there
        costs one Poll; best effort: without an answer there is no tail."""
        if self._tail_of_start == status.start_id:
            return
        self._tail_of_start = status.start_id
        tail = status.output_tail
        if not tail and self.poll_batch_window > 0:
            try:
                tail = (await self.client.poll(self.remote_name)).output_tail
            except OutpostError as e:
                self.log.info("Could not get the last output of %s: %s", self._log_name, e)
        if tail:
            self._log_output_tail(tail)
            self.last_output_tail = tail

    def _log_output_tail(self, tail: str) -> None:
        self.log.warning(
            "Last output of %s at Outpost %s:\n%s",
            self._log_name, self.outpost_name, "\n".join(f"    {line}" for line in tail.splitlines()),
        )  # fmt: skip

    def _outpost_stopped(self, message: str) -> None:
        """The Outpost stopped the server on its own: JupyterHub only logs an exit code,
        so the reason goes to the hub's log (WARNING) and, kept here, to the user on the
        spawn page of the next start."""
        if message != self.stop_message:
            self.log.warning("Outpost %s stopped %s: %s", self.outpost_name, self._log_name, message)
        self.stop_message = message

    async def _restore_tunnel(self):
        """After a hub restart: the forward on the same local port the hub's DB knows."""
        tunnel = self._tunnel()
        if tunnel is not None and tunnel.local_port(self.remote_name) != self.local_port:
            try:
                await tunnel.forward(
                    self.remote_name, self.remote_host, self.remote_port,
                    local_port=self.local_port, listen_host=self.tunnel_listen_host,
                )
            except Exception as e:
                self.log.warning("Could not restore the tunnel to %s: %s", self._log_name, e)

    async def stop(self, now=False):
        if not self.start_id:
            return
        tunnel = self._tunnel()
        if tunnel is not None:
            await tunnel.close_forward(self.remote_name)
        client = self.client
        await self._retry("Stop", lambda: client.stop(self.remote_name, self.start_id))
        self.log.info("Stopped %s at Outpost %s", self._log_name, self.outpost_name)
