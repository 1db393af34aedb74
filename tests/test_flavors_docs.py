"""docs/flavors.md's examples do what the page says they do: its configs are accepted as
they stand (the two-hub example against batchspawner's SlurmSpawner, whose options it
sets), each hub and user gets the flavors the page promises, and the sentences the page
quotes are the ones the Outpost sends."""

from __future__ import annotations

import re

import pytest
from batchspawner import SlurmSpawner
from traitlets.config import Config

from outpost_client.errors import FlavorNotAllowed, UnknownFlavor
from outpost_server.flavors import FlavorSet, Usage, limit_refusal
from outpost_server.options import read_flavors_file

from .harness.outpost import ROOT

pytestmark = pytest.mark.unit

PAGE = (ROOT / "docs" / "flavors.md").read_text()


def code_blocks(language: str, section: str = "") -> list[str]:
    """The ```language blocks of the page (of one `## section` only, if named)."""
    text = PAGE
    if section:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def outpost_config(source: str) -> Config:
    """What an outpost_config.py with source sets (c = get_config(), as the Outpost loads it)."""
    c = Config()
    exec(compile(source, "outpost_config.py", "exec"), {"c": c, "get_config": lambda: c})
    return c


def two_hub_example() -> tuple[Config, FlavorSet]:
    (source,) = code_blocks("python", "Several hubs: an example")
    c = outpost_config(source)
    flavors = FlavorSet.parse(
        c.Outpost.flavors, max_servers_per_user=c.Outpost.max_servers_per_user, spawner_class=SlurmSpawner
    )
    return c, flavors


def test_the_two_hub_example_gives_the_gpu_flavor_only_to_one_hubs_group():
    c, flavors = two_hub_example()
    assert c.Outpost.spawner_class == "batchspawner.SlurmSpawner"
    assert [f.name for f in flavors.offered("chem")] == ["small", "large"]
    assert [f.name for f in flavors.offered("physics")] == ["small", "large", "gpu"]
    assert flavors.default_for("chem").name == flavors.default_for("physics").name == "small"

    member = {"name": "alice", "groups": ["gpu-users"], "admin": False}
    other = {"name": "bob", "groups": ["students"], "admin": False}
    assert flavors.resolve("physics", member, "gpu").config["req_ngpus"] == "1"
    with pytest.raises(FlavorNotAllowed) as refused:
        flavors.resolve("physics", other, "gpu")
    assert str(refused.value) == "Flavor 'gpu' is not for your groups."
    # another hub's flavor is answered as one that does not exist: chem learns nothing of it
    with pytest.raises(UnknownFlavor) as refused:
        flavors.resolve("chem", member, "gpu")
    with pytest.raises(UnknownFlavor) as unknown:
        flavors.resolve("chem", member, "no-such-flavor")
    assert str(unknown.value) == str(refused.value).replace("'gpu'", "'no-such-flavor'")
    # the page quotes each of these sentences
    for sentence in ("Flavor 'gpu' is not for your groups.", str(refused.value)):
        assert sentence in PAGE.replace("\n  ", " "), sentence


def test_the_two_hub_example_limits_read_as_the_page_says():
    _, flavors = two_hub_example()
    large, gpu = flavors.by_name["large"], flavors.by_name["gpu"]
    cap = flavors.max_servers_per_user
    # 12 of the physics hub's large servers running: its users are refused, chem's are not
    hub_full = limit_refusal(large, Usage(total=12, hub=12, user=0, user_total=1), cap)
    assert hub_full.metadata == {"flavor": "large", "limit": "hub", "max": "12", "in_use": "12"}
    assert hub_full.message.startswith("Your hub's share of flavor 'large' (12 servers) is in use.")
    assert hub_full.message.split(" Try")[0] in PAGE
    assert limit_refusal(large, Usage(total=12, hub=0, user=0, user_total=1), cap) is None
    # four GPU servers at the site: full for everyone
    site_full = limit_refusal(gpu, Usage(total=4, hub=1, user=0, user_total=0), cap)
    assert site_full.metadata["limit"] == "total"
    assert site_full.message in PAGE
    # three servers of any flavors: a fourth is refused, whatever the flavor
    assert limit_refusal(flavors.by_name["small"], Usage(total=1, hub=1, user=1, user_total=3), cap).metadata[
        "limit"
    ] == "user_total"


def test_the_first_flavor_and_the_yaml_file_are_accepted(tmp_path):
    c = outpost_config(code_blocks("python", "A first flavor")[0])
    first = FlavorSet.parse(c.Outpost.flavors)
    (yaml_text,) = code_blocks("yaml", "The fields of a flavor")
    path = tmp_path / "flavors.yaml"
    path.write_text(yaml_text)
    from_file = FlavorSet.parse(read_flavors_file(str(path)))
    # the YAML is the same flavor as the Python
    assert from_file.by_name == first.by_name
    assert first.default_for("any-hub").max_runtime == 8 * 3600


def test_the_negated_match_of_the_mapping_table_works():
    """The page's stand-in for the REST Outpost's negate_authentication."""
    pattern = re.search(r"`users_regex: '([^']+)'`", PAGE).group(1)
    flavors = FlavorSet.parse({"minimal": {"users_regex": pattern}})
    minimal = flavors.by_name["minimal"]
    assert minimal.refusal_for_user({"name": "guest@gmail.com"}) == ""
    assert minimal.refusal_for_user({"name": "alice@mycompany.org"}) != ""
