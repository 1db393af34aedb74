"""Docs that must match the code."""

from __future__ import annotations

import re
import sys

import pytest
from traitlets import Float, Integer

from .harness.outpost import ROOT

pytestmark = pytest.mark.unit

sys.path.insert(0, str(ROOT / "scripts"))

import gen_config_docs  # noqa: E402


def test_config_reference_does_not_drift():
    diff = gen_config_docs.check()
    assert not diff, (
        "docs/config-reference.md differs from what the traits' help generates: run `make docs`\n" + diff
    )


def section(text: str, heading: str) -> str:
    """The body of the `### heading` section of text."""
    body = text.split(f"\n### {heading}\n", 1)[1]
    return body.split("\n#", 1)[0]


def test_reference_renders_aliases_bounds_choices_and_defaults():
    text = gen_config_docs.render()
    port = section(text, "`Outpost.port`")
    assert "Command line: `--port`" in port and "Default: `50051`" in port
    assert "Command line: `-f`, `--config`" in section(text, "`Outpost.config_file`")
    assert "Command line: `--allow-plaintext`" in section(text, "`Outpost.allow_plaintext`")
    assert "at least `0`" in section(text, "`Outpost.max_concurrent_starts_per_hub`")
    assert "at least `1024`" in section(text, "`HubAPIRelay.max_body_bytes`")
    assert 'one of `"cn"`, `"san"`' in section(text, "`Outpost.hub_identity_from`")
    assert "Default: `LocalProcessSpawner`" in section(text, "`Outpost.spawner_class`")
    assert 'Default: `""`' in section(text, "`Outpost.tls_cert`")
    assert "Default: `{}`" in section(text, "`SSHForwarder.authorized_keys`")
    # computed from $OUTPOST_CRYPT_KEY at start-up: never the value of the machine that generates
    assert "Default: computed" in section(text, "`Outpost.crypt_keys`")
    assert "| `--port` | [`Outpost.port`](#outpostport) |" in text
    # the inherited Application options are named, not described
    assert "### `Outpost.log_level`" not in text and "`log_level`" in text


def test_renderer_pieces():
    assert gen_config_docs.bounds(Integer(min=1, max=10)) == "`1` to `10`"
    assert gen_config_docs.bounds(Integer(max=10)) == "at most `10`"
    assert gen_config_docs.bounds(Float()) == ""
    assert gen_config_docs.value_repr({"a": [1, 2.5, True]}) == '{"a": [1, 2.5, True]}'
    help_text = """First line.

        Empty: <tmp>/dir, *not* emphasis; `<kept>` in code. Run
            echo one
            echo two
        # not a heading
        """
    assert gen_config_docs.render_help(help_text) == [
        "First line.",
        "",
        "Empty: &lt;tmp>/dir, \\*not\\* emphasis; `<kept>` in code. Run",
        "",
        "```",
        "echo one",
        "echo two",
        "```",
        "",
        "\\# not a heading",
    ]


def anchors(path) -> set[str]:
    """The fragments GitHub gives the headings of a Markdown file (code blocks skipped)."""
    found: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} (.*)", line)):
            anchor = base = gen_config_docs.github_anchor(match.group(1))
            n = 0
            while anchor in found:
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


def test_links_to_sections_resolve():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for path in files:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            linked = (path.parent / target).resolve() if target else path
            if not linked.exists() or fragment not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target}#{fragment}")
    assert not broken, f"links to sections that do not exist: {broken}"


def test_every_outpost_spawner_option_is_documented():
    from outpost_client.spawner import OutpostSpawner
    from jupyterhub.spawner import Spawner

    text = (ROOT / "docs" / "hub.md").read_text()
    own = set(OutpostSpawner.class_traits(config=True)) - set(Spawner.class_traits(config=True))
    missing = sorted(name for name in own if f"`{name}`" not in text)
    assert not missing, f"docs/hub.md does not describe OutpostSpawner: {missing}"


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


# [test_file] or [test_file: `test_a`, `test_b`; test_other: `test_c`] in docs/security.md
_CITATION = re.compile(r"\[(test_\w+(?:[^\]]*))\]")


def security_citations(text: str) -> list[tuple[str, str]]:
    """(test module, test name or "") for every test docs/security.md names."""
    cited = []
    for bracket in _CITATION.findall(text):
        for part in bracket.split(";"):
            module, _, names = part.strip().partition(":")
            module = module.split(",")[0].split()[0]
            found = re.findall(r"`(test_\w+)", names)
            cited += [(module, name) for name in found] or [(module, "")]
    return cited


def test_every_test_security_md_names_exists():
    """Every promise on the security page names tests; a renamed or deleted test must
    not leave a promise without one."""
    text = (ROOT / "docs" / "security.md").read_text()
    cited = security_citations(text)
    assert len(cited) > 50
    missing = []
    for module, name in cited:
        path = ROOT / "tests" / f"{module}.py"
        if not path.exists():
            missing.append(f"{module} (no such file)")
        elif name and not re.search(rf"^(async )?def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{module}::{name}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_security_citations_are_read_whole():
    text = "a [test_x: `test_a`,\n  `test_b`; test_y] b [test_z, on a real cluster] c [not_a_test]"
    assert security_citations(text) == [("test_x", "test_a"), ("test_x", "test_b"), ("test_y", ""), ("test_z", "")]
