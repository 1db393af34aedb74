#!/usr/bin/env python3
"""Regenerate docs/config-reference.md from the configurable classes' own traits.

Usage: python scripts/gen_config_docs.py [--check] [--out FILE]

Every option's name, type, default, bounds, choices and command-line option come from
its trait, and its text from the trait's `help=`: to change the reference, change the
code and run `make docs`. `--check` writes nothing and exits 1, with a diff, when the
committed file differs from what the code generates (tests/test_docs.py does the same).

Only each class's own traits are listed (the Outpost's include those of its option
mixins, outpost_server/options.py). The Outpost's inherited traitlets Application
options (log_level, log_format, ...) are named in one line, not described: they work as
in every traitlets application, and the two of them with command-line options
(`--log-level`, `--debug`) are in the command-line table.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import re
import sys
from pathlib import Path

from traitlets import CaselessStrEnum, Enum, Type

ROOT = Path(__file__).resolve().parent.parent
# the classes of this tree, not of whichever checkout an editable install points at
sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "config-reference.md"
HEADER = "<!-- Generated — do not edit; regenerate with `make docs` (scripts/gen_config_docs.py). -->\n"


def configurable_classes() -> list[type]:
    """The classes whose options the reference describes, in the order it shows them."""
    from outpost_server.app import Outpost
    from outpost_server.forwarder import SSHForwarder
    from outpost_server.relay import HubAPIRelay

    return [Outpost, SSHForwarder, HubAPIRelay]


# --- small renderers -----------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading (before de-duplication)."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def trait_heading(cls: type, name: str) -> str:
    return f"`{cls.__name__}.{name}`"


def value_repr(value) -> str:
    """A default as one would write it in outpost_config.py (classes by their name)."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{value_repr(k)}: {value_repr(v)}" for k, v in value.items()) + "}"
    return repr(value)


def type_name(trait) -> str:
    """The trait's class name, with the element traits of a container: `Dict[Unicode, List[Unicode]]`."""
    name = type(trait).__name__
    key = getattr(trait, "_key_trait", None)
    value = getattr(trait, "_value_trait", None)
    item = getattr(trait, "_trait", None)
    if key is not None or value is not None:
        parts = [type_name(key) if key is not None else "Any", type_name(value) if value is not None else "Any"]
        return f"{name}[{', '.join(parts)}]"
    if item is not None:
        return f"{name}[{type_name(item)}]"
    return name


def bounds(trait) -> str:
    """`at least 0`, `at most 9`, `1 to 9` from an Integer's or Float's min/max; "" without."""

    def finite(x):
        return x is not None and not (isinstance(x, float) and math.isinf(x))

    low = getattr(trait, "min", None)
    high = getattr(trait, "max", None)
    low = low if finite(low) else None
    high = high if finite(high) else None
    if low is not None and high is not None:
        return f"`{value_repr(low)}` to `{value_repr(high)}`"
    if low is not None:
        return f"at least `{value_repr(low)}`"
    if high is not None:
        return f"at most `{value_repr(high)}`"
    return ""


def choices(trait) -> str:
    """An Enum's allowed values; "" for other traits."""
    if not isinstance(trait, Enum):
        return ""
    text = "one of " + ", ".join(f"`{value_repr(v)}`" for v in trait.values)
    if isinstance(trait, CaselessStrEnum):
        text += " (case-insensitive)"
    return text


def class_choice(trait) -> str:
    """What a Type trait takes (a subclass, its import string, an entry-point name); "" for others."""
    if not isinstance(trait, Type) or not isinstance(trait.klass, type):
        return ""
    group = getattr(trait, "entry_point_group", None)  # JupyterHub's EntryPointType
    if group:
        return f"a `{trait.klass.__name__}` subclass, its import string or a `{group}` entry-point name"
    return f"a `{trait.klass.__name__}` subclass or its import string"


def has_computed_default(cls: type, name: str) -> bool:
    """Whether cls computes the trait's default with @default (so it depends on the run)."""
    return any(name in getattr(k, "_trait_default_generators", {}) for k in cls.__mro__)


def default_text(cls: type, name: str, trait) -> str:
    if has_computed_default(cls, name):
        return "computed at start-up (see below)"
    return f"`{value_repr(trait.default())}`"


def option_names(key) -> list[str]:
    """An alias's or flag's key ("port", "f", or a tuple of them) as command-line options."""
    keys = key if isinstance(key, tuple) else (key,)
    names = [f"-{k}" if len(k) == 1 else f"--{k}" for k in keys]
    return sorted(names, key=lambda n: (n.startswith("--"), n))


def find_trait(target: str):
    """The trait "Class.name" names, looked up in the described classes and their bases."""
    cls_name, _, name = target.partition(".")
    for cls in configurable_classes():
        for klass in cls.__mro__:
            if klass.__name__ == cls_name and hasattr(klass, "class_traits"):
                return klass.class_traits().get(name)
    return None


def command_line(app: type, anchors: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """The application's aliases and flags as table rows, and a map "Class.trait" -> the
    options that set it, for the trait sections."""

    def link(target: str) -> str:
        return f"[`{target}`](#{anchors[target]})" if target in anchors else f"`{target}`"

    by_target: dict[str, list[str]] = {}
    for key, target in app.aliases.items():
        if isinstance(target, tuple):  # traitlets 5 also takes (target, help)
            target = target[0]
        by_target.setdefault(target, []).extend(option_names(key))
    rows = []
    options: dict[str, list[str]] = {}
    for target, names in by_target.items():
        names = sorted(names, key=lambda n: (n.startswith("--"), n))
        options.setdefault(target, []).extend(names)
        trait = find_trait(target)
        extra = choices(trait) if trait is not None else ""
        sets = link(target) + (f", {extra}" if extra else "")
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {sets} |")
    for key, (config, help_text) in app.flags.items():
        names = option_names(key)
        settings = [(f"{cls}.{trait}", value) for cls, traits in config.items() for trait, value in traits.items()]
        sets = ", ".join(f"{link(t)} = `{value_repr(v)}`" for t, v in settings)
        text = escape(help_text.strip()).replace("|", "\\|")
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {sets}: {text} |")
        for target, _ in settings:
            options.setdefault(target, []).extend(names)
    return rows, options


# --- help text -------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def escape(text: str) -> str:
    """Prose from a help text as Markdown that shows it as written: `<tmp>` must not become a
    tag, `*` not emphasis, a leading `#` not a heading. Code spans stay as they are."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        part = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
        parts[i] = part
    line = "".join(parts)
    if re.match(r"\s*[#>]", line):
        line = re.sub(r"^(\s*)([#>])", r"\1\\\2", line)
    return line


def render_help(help_text: str) -> list[str]:
    """A trait's help as Markdown lines: paragraphs as written, and lines indented by 4 or more
    (relative to the text; commands, examples) as a fenced code block."""
    lines = inspect.cleandoc(help_text or "").splitlines()
    out: list[str] = []
    code: list[str] = []

    def flush_code():
        if code:
            if out and out[-1] != "":
                out.append("")
            out.append("```")
            out.extend(code)
            out.append("```")
            out.append("")
            code.clear()

    for line in lines:
        if line.startswith("    ") and line.strip():
            code.append(line[4:])
            continue
        flush_code()
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(escape(line.strip()))
    flush_code()
    while out and out[-1] == "":
        out.pop()
    return out or ["(No help text.)"]


# --- the document --------------------------------------------------------------------


def option_groups(cls: type) -> list[type]:
    """cls and the option mixins it is made of (outpost_server/options.py: traits of
    plain HasTraits classes, configured as cls's own), in the order of its bases."""
    from traitlets.config import Configurable

    mixins = [k for k in cls.__mro__[1:] if not issubclass(k, Configurable) and "class_own_traits" in dir(k)]
    return [cls, *(k for k in mixins if k.__module__.startswith("outpost_server"))]


def own_config_traits(cls: type) -> list[tuple[str, object]]:
    """cls's own config traits (its option mixins' included) in the order their class
    bodies define them."""
    out = []
    for group in option_groups(cls):
        own = group.class_own_traits(config=True)
        out += [(name, own[name]) for name in vars(group) if name in own]
    return out


def inherited_note(cls: type, cli_options: dict[str, list[str]]) -> list[str]:
    """One paragraph naming the config traits cls inherits (the Outpost's from traitlets'
    Application): they are not described, and a command-line option that sets one is named."""
    inherited = sorted(set(cls.class_traits(config=True)) - {name for name, _ in own_config_traits(cls)})
    if not inherited:
        return []
    by_owner: dict[str, list[str]] = {}
    for name in inherited:
        owner = next(k for k in cls.__mro__[1:] if name in k.class_own_traits())
        by_owner.setdefault(f"{owner.__module__}.{owner.__name__}", []).append(name)
    text = " ".join(
        f"Inherited from `{owner}` and not described here: {', '.join(f'`{n}`' for n in names)}."
        for owner, names in by_owner.items()
    )
    for name in inherited:
        options = [o for target, opts in cli_options.items() if target.endswith(f".{name}") for o in opts]
        if options:
            text += f" {', '.join(f'`{o}`' for o in options)} set `{name}` (command line, above)."
    return [text, ""]


def render() -> str:
    classes = configurable_classes()
    app = classes[0]
    anchors = {
        f"{cls.__name__}.{name}": github_anchor(trait_heading(cls, name))
        for cls in classes
        for name, _ in own_config_traits(cls)
    }
    rows, cli_options = command_line(app, anchors)

    out = [
        HEADER.rstrip("\n"),
        "",
        "# Configuration reference",
        "",
        "Every option of `jupyterhub-outpost`, generated from the code (each option's `help=`):",
        "change it there and run `make docs`. How the config file works, with examples and the",
        "mTLS, token, SSH-forwarder and relay walkthroughs: [configuration.md](configuration.md).",
        "",
        "Set an option in `outpost_config.py` as `c.Class.option = value`, or on the command line",
        "as `--Class.option=value`; the command line wins.",
        "",
        "## Command line",
        "",
        "| option | sets |",
        "| --- | --- |",
    ]
    out += rows
    out.append("")

    for cls in classes:
        title = f"`c.{cls.__name__}`"
        out += [f"## {title}", ""]
        doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
        if doc:
            out += [escape(" ".join(doc.split())), ""]
        out += inherited_note(cls, cli_options)
        for name, trait in own_config_traits(cls):
            out += [f"### {trait_heading(cls, name)}", ""]
            facts = [f"Type: `{type_name(trait)}`"]
            for extra in (choices(trait), bounds(trait), class_choice(trait)):
                if extra:
                    facts[0] += f", {extra}"
            facts.append(f"Default: {default_text(cls, name, trait)}")
            cli = cli_options.get(f"{cls.__name__}.{name}")
            if cli:
                facts.append("Command line: " + ", ".join(f"`{n}`" for n in cli))
            out += [" · ".join(facts), ""]
            # EntryPointType's help lists the entry points installed here: use what the code says
            out += render_help(getattr(trait, "_original_help", None) or trait.help)
            out.append("")
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def check(path: Path = OUT) -> str:
    """"" when path holds what render() gives, else a unified diff (committed -> generated)."""
    fresh = render()
    committed = path.read_text() if path.exists() else ""
    if committed == fresh:
        return ""
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = str(path)
    diff = difflib.unified_diff(
        committed.splitlines(keepends=True),
        fresh.splitlines(keepends=True),
        fromfile=f"{shown} (committed)",
        tofile=f"{shown} (generated)",
    )
    return "".join(diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="file to write (or check)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    args = parser.parse_args(argv)
    if args.check:
        diff = check(args.out)
        if diff:
            sys.stderr.write(diff)
            sys.stderr.write(f"\n{args.out} differs from what the code generates: run `make docs`\n")
            return 1
        return 0
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
