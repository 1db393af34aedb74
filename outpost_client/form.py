"""The spawn form OutpostSpawner offers: each Outpost (a system) with its flavors.

Pure builders, no I/O (the spawner asks the Outposts; see ``OutpostSpawner.get_options_form``):

- :class:`SystemChoice`: one Outpost as the form shows it, from its ListFlavors answer
  (or the sentence saying why it cannot be reached now);
- :func:`render_form`: the HTML JupyterHub puts inside its ``<form>``; every text in it
  (names, display names, descriptions, reasons: they come from the Outposts and the hub's
  config) is escaped;
- :func:`options_from_form`: the POSTed form as ``user_options`` ({"outpost", "flavor"}),
  refusing with a 400 the user reads what the form never offered the syntax of.

The form's one field, ``outpost_flavor``, is ``<outpost>/<flavor>`` (an empty flavor: the
Outpost's default, or an Outpost without flavors); a hidden ``outpost_form`` marks the POST
as this form's, so a site's own form (without it) passes through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

from tornado import web

from .v1 import outpost_pb2 as pb

FIELD = "outpost_flavor"
MARKER = "outpost_form"
# what the Outpost takes as a flavor name (proto: 1 to 64 characters, as server names)
FLAVOR_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@dataclass
class SystemChoice:
    """One Outpost in the form: its flavors for this user, or why it cannot be offered."""

    name: str  # the hub's name of the Outpost (OutpostSpawner.outposts key, or "default")
    label: str  # what the user reads (OutpostSpawner.outpost_display_names)
    flavors: Sequence[pb.Flavor] = ()
    default_flavor: str = ""
    user_max_total: int = 0
    user_in_use_total: int = 0
    error: str = ""  # set: the Outpost could not be asked (a sentence for the user)
    offered: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.offered = not self.error


def duration(seconds: int) -> str:
    """A runtime as a person reads it: "8 h", "1 h 30 min", "2 d 4 h", "45 min", "30 s"."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    units = (("d", 86400), ("h", 3600), ("min", 60))
    parts = []
    for unit, size in units:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}")
    return " ".join(parts[:2])


def usage(flavor: pb.Flavor) -> str:
    """What is in use of a flavor, against its limits: "3 of 8 in use · yours: 0 of 1"."""
    parts = [
        f"{flavor.in_use_total} of {flavor.max_total} in use" if flavor.max_total else f"{flavor.in_use_total} in use"
    ]
    if flavor.max_per_hub:
        parts.append(f"this hub: {flavor.in_use_hub} of {flavor.max_per_hub}")
    if flavor.max_per_user:
        parts.append(f"yours: {flavor.in_use_user} of {flavor.max_per_user}")
    return " · ".join(parts)


def needs_form(systems: Sequence[SystemChoice]) -> bool:
    """Whether there is anything to choose: several Outposts, or flavors at one."""
    return len(systems) > 1 or any(s.flavors for s in systems)


def value_of(system: str, flavor: str = "") -> str:
    return f"{system}/{flavor}"


def pick(systems: Sequence[SystemChoice], previous: Mapping[str, object]) -> str:
    """The choice checked when the form opens: the user's previous one if it can be started
    now, else the first Outpost's default flavor if available, else the first choice that is."""
    available = [value_of(s.name, f.name) for s in systems if s.offered for f in s.flavors if f.available]
    available += [value_of(s.name) for s in systems if s.offered and not s.flavors]
    if previous.get("outpost"):
        wanted = value_of(str(previous["outpost"]), str(previous.get("flavor") or ""))
        if wanted in available:
            return wanted
    for s in systems:
        if s.offered and s.default_flavor and value_of(s.name, s.default_flavor) in available:
            return value_of(s.name, s.default_flavor)
    ordered = [value_of(s.name, f.name) if f is not None else value_of(s.name) for s, f in _choices(systems)]
    return next((v for v in ordered if v in available), "")


def _choices(systems: Sequence[SystemChoice]) -> Iterable[tuple[SystemChoice, pb.Flavor | None]]:
    for s in systems:
        if not s.offered:
            continue
        if s.flavors:
            for f in s.flavors:
                yield s, f
        else:
            yield s, None


def render_form(systems: Sequence[SystemChoice], checked: str = "") -> str:
    """The spawn form's HTML (inside JupyterHub's ``<form>``, before its Start button)."""
    out = [
        f'<input type="hidden" name="{MARKER}" value="1">',
        '<div class="outpost-form">',
    ]
    for i, system in enumerate(systems):
        out.append(f'<fieldset class="outpost-system mb-3" data-outpost="{escape(system.name)}">')
        out.append(f'<legend class="outpost-system-name">{escape(system.label)}</legend>')
        if not system.offered:
            out.append(f'<p class="outpost-unreachable text-danger">{escape(system.error)}</p>')
            out.append("</fieldset>")
            continue
        if system.user_max_total:
            out.append(
                '<p class="outpost-user-total text-muted">'
                f"You have {system.user_in_use_total} of at most {system.user_max_total} servers here.</p>"
            )
        if not system.flavors:
            out.append(_radio(f"outpost-choice-{i}", value_of(system.name), checked, escape(system.label)))
        for j, flavor in enumerate(system.flavors):
            out.append(_flavor_radio(f"outpost-choice-{i}-{j}", system.name, flavor, checked))
        out.append("</fieldset>")
    out.append("</div>")
    return "\n".join(out)


def _radio(ident: str, value: str, checked: str, label_html: str, *, disabled: bool = False, css: str = "") -> str:
    attrs = " checked" if value == checked and not disabled else ""
    attrs += " disabled" if disabled else ""
    return (
        f'<div class="form-check outpost-choice{css}">'
        f'<input class="form-check-input" type="radio" name="{FIELD}" id="{ident}" value="{escape(value)}"{attrs}>'
        f'<label class="form-check-label" for="{ident}">{label_html}</label>'
        "</div>"
    )


def _flavor_radio(ident: str, system: str, flavor: pb.Flavor, checked: str) -> str:
    parts = [f'<strong class="flavor-name">{escape(flavor.display_name or flavor.name)}</strong>']
    parts.append(f' <span class="flavor-usage badge text-bg-light">{escape(usage(flavor))}</span>')
    if flavor.max_runtime_seconds:
        parts.append(f' <span class="flavor-runtime text-muted">up to {duration(flavor.max_runtime_seconds)}</span>')
    if flavor.description:
        parts.append(f'<br><small class="flavor-description text-muted">{escape(flavor.description)}</small>')
    if not flavor.available:
        reason = flavor.unavailable_reason or "Not available now."
        parts.append(f'<br><small class="flavor-unavailable text-danger">{escape(reason)}</small>')
    return _radio(
        ident, value_of(system, flavor.name), checked, "".join(parts),
        disabled=not flavor.available, css="" if flavor.available else " unavailable",
    )  # fmt: skip


def refusal(message: str, status: int = 400) -> web.HTTPError:
    """An HTTPError whose message JupyterHub shows as it is (not "HTTP 400: Bad Request
    (...)"): above the form on a POST, on the spawn page after a start."""
    error = web.HTTPError(status, message)
    error.jupyterhub_message = message
    return error


def options_from_form(form_data: Mapping[str, list], outposts: Iterable[str]) -> dict:
    """The user_options of a POST of :func:`render_form`'s form: {"outpost": name} and,
    if a flavor was chosen, "flavor". Form data without the form's marker (a site's own
    form) is returned as it came (JupyterHub's default, "passthrough").

    Only the syntax is checked here (the Outpost decides whether the flavor may start):
    one choice, of a configured Outpost, with a well-formed flavor name; else a 400 whose
    message the spawn page shows above the form.
    """
    if MARKER not in form_data:
        return dict(form_data)
    values = form_data.get(FIELD) or []
    if len(values) != 1 or not isinstance(values[0], str):
        raise refusal("Choose one of the offered systems and flavors, then Start.")
    outpost, sep, flavor = values[0].rpartition("/")
    if not sep or outpost not in set(outposts):
        raise refusal("That system is not offered here: choose one of the list.")
    if flavor and not FLAVOR_NAME_RE.fullmatch(flavor):
        raise refusal("That flavor is not offered here: choose one of the list.")
    options = {"outpost": outpost}
    if flavor:
        options["flavor"] = flavor
    return options
