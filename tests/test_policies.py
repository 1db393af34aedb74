"""What a hub may send that reaches the site's Spawner (outpost_server/policy.py): env
keys (c.Outpost.allow_env) and user_options keys (c.Outpost.allow_user_options), next to
config_overrides (allow_override, tests/test_rpc.py). Default-deny; a refusal names the
keys, answers PERMISSION_DENIED with its own reason, and leaves nothing behind."""

from __future__ import annotations

import grpc
import pytest
from traitlets import TraitError

from outpost_client import EnvNotAllowed, ServerNotFound, UserOptionNotAllowed, pb
from outpost_client.errors import ENV_NOT_ALLOWED, USER_OPTION_NOT_ALLOWED
from outpost_client.spawner import OutpostStartFailed
from outpost_server.app import Outpost
from outpost_server.policy import default_hub_env_key

from .harness.hub import make_spawner
from .harness.outpost import stored_rows
from .harness.util import sid

pytestmark = pytest.mark.rpc

HUB_ENV = {  # what JupyterHub's Spawner.get_env() sets, abridged: always allowed
    "JUPYTERHUB_API_TOKEN": "t",
    "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
    "JUPYTERHUB_SERVICE_PREFIX": "/user/u/",
    "JPY_API_TOKEN": "t",
    "MEM_LIMIT": "1073741824",
    "CPU_LIMIT": "1.0",
}
HOSTILE_ENV = {"LD_PRELOAD": "/tmp/evil.so", "SBATCH_PARTITION": "gpu", "PYTHONPATH": "/tmp/evil"}


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("JUPYTERHUB_API_TOKEN", True), ("JUPYTERHUB_ANYTHING", True), ("JPY_API_TOKEN", True),
        ("MEM_GUARANTEE", True), ("CPU_GUARANTEE", True), ("LD_PRELOAD", False), ("PATH", False),
        ("SLURM_CONF", False), ("jupyterhub_api_token", False), ("XJUPYTERHUB_", False),
    ],
)  # fmt: skip
def test_the_env_every_hub_may_send(key, allowed):
    assert default_hub_env_key(key) is allowed


async def test_hostile_env_is_refused_by_name_and_leaves_nothing(start_outpost):
    async with start_outpost() as op:
        ok = await op.client.start("fine", sid(), user_name="u", env=HUB_ENV, wait_until_ready=True)
        assert ok.status.state == pb.SERVER_STATE_RUNNING
        with pytest.raises(EnvNotAllowed) as err:
            await op.client.start("evil", sid(), user_name="u", env={**HUB_ENV, **HOSTILE_ENV})
        e = err.value
        assert (e.code, e.reason) == (grpc.StatusCode.PERMISSION_DENIED, ENV_NOT_ALLOWED)
        assert e.metadata["keys"] == "LD_PRELOAD,PYTHONPATH,SBATCH_PARTITION"
        assert "LD_PRELOAD, PYTHONPATH, SBATCH_PARTITION" in e.message and "JUPYTERHUB" not in e.message
        with pytest.raises(ServerNotFound):
            await op.client.poll("evil")
        assert [r["server_name"] for r in await stored_rows(op.app)] == ["fine"]


async def test_allow_env_per_hub_list_and_callable(start_outpost):
    async def policy(hub, env):
        if "FORBIDDEN" in env:
            raise ValueError("FORBIDDEN is never accepted")
        return ["EXTRA_A", "FORBIDDEN"]

    async with start_outpost(allow_env={"default": ["EXTRA_A"], "other-hub": True}) as op:
        await op.client.start("a", sid(), user_name="u", env={**HUB_ENV, "EXTRA_A": "1"})
        with pytest.raises(EnvNotAllowed) as err:
            await op.client.start("b", sid(), user_name="u", env={"EXTRA_B": "1"})
        assert err.value.metadata["keys"] == "EXTRA_B"  # other-hub's True is not ours
    async with start_outpost(allow_env=policy) as op:
        await op.client.start("a", sid(), user_name="u", env={"EXTRA_A": "1"})
        with pytest.raises(EnvNotAllowed) as err:
            await op.client.start("b", sid(), user_name="u", env={"FORBIDDEN": "1"})
        assert "FORBIDDEN is never accepted" in err.value.message
    async with start_outpost(allow_env=True) as op:  # the behaviour before the option
        await op.client.start("a", sid(), user_name="u", env=HOSTILE_ENV)


async def test_user_options_are_refused_unless_allowed(start_outpost):
    async with start_outpost() as op:
        await op.client.start("none", sid(), user_name="u", user_options={})
        with pytest.raises(UserOptionNotAllowed) as err:
            await op.client.start("evil", sid(), user_name="u", user_options={"partition": "gpu", "cmd": "x"})
        e = err.value
        assert (e.code, e.reason) == (grpc.StatusCode.PERMISSION_DENIED, USER_OPTION_NOT_ALLOWED)
        assert e.metadata["keys"] == "cmd,partition" and "cmd, partition" in e.message
        with pytest.raises(ServerNotFound):
            await op.client.poll("evil")
    async with start_outpost(allow_user_options=["profile"]) as op:
        await op.client.start("ok", sid(), user_name="u", user_options={"profile": "small"})
        with pytest.raises(UserOptionNotAllowed):
            await op.client.start("evil", sid(), user_name="u", user_options={"profile": "small", "cmd": "x"})


async def test_the_hubs_user_reads_the_refusal(start_outpost):
    """Through OutpostSpawner, as on the spawn page: the message names the keys; the
    hub's own routing key ("outpost") is not sent, so it is never refused."""
    async with start_outpost() as op:

        async def hostile_env(spawner, env):
            return {**env, "LD_PRELOAD": "/tmp/evil.so"}

        spawner = make_spawner(op, custom_env=hostile_env)
        with pytest.raises(OutpostStartFailed) as err:
            await spawner.start()
        assert "environment variables LD_PRELOAD" in err.value.jupyterhub_message
        assert spawner.start_id == ""  # refused: nothing to poll or stop

        spawner = make_spawner(op)
        spawner.user_options = {"outpost": "default"}
        await spawner.start()
        assert op.manager.records[("default", spawner.remote_name)].spec.user_options == {}
        await spawner.stop()


@pytest.mark.parametrize("option", ["allow_env", "allow_user_options"])
def test_a_malformed_policy_stops_start_up(option):
    with pytest.raises(TraitError, match=option):
        Outpost(**{option: {"hub": {"nested": True}}})
    with pytest.raises(TraitError, match=option):
        Outpost(**{option: 42})
