"""Docs that must match the code."""

from __future__ import annotations

import pytest

from outpost_server.app import Outpost

from .harness.outpost import ROOT

pytestmark = pytest.mark.unit

INHERITED = {"log_datefmt", "log_format", "log_level", "logging_config", "show_config", "show_config_json"}


def test_every_outpost_option_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        name
        for name in Outpost.class_traits(config=True)
        if name not in INHERITED and name not in ("config_file", "generate_config") and f"`{name}`" not in text
    ]
    assert not missing, f"docs/configuration.md does not describe: {missing}"


def test_every_forwarder_option_is_documented():
    from outpost_server.forwarder import SSHForwarder

    text = (ROOT / "docs" / "configuration.md").read_text().split("c.SSHForwarder", 1)[1]
    missing = [name for name in SSHForwarder.class_traits(config=True) if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not describe SSHForwarder: {missing}"


def test_every_relay_option_is_documented():
    from outpost_server.relay import HubAPIRelay

    text = (ROOT / "docs" / "configuration.md").read_text().split("c.HubAPIRelay", 1)[1]
    missing = [name for name in HubAPIRelay.class_traits(config=True) if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not describe HubAPIRelay: {missing}"


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
