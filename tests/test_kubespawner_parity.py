"""KubeSpawner hosted by the Outpost builds what the same KubeSpawner builds inside JupyterHub.

No Kubernetes API server runs here (tests/harness/kube.py: a fault-injection fake in place
of the API client, loaded empty reflectors, a kubeconfig naming no server). Each case
starts the same user's same server with the same options twice, through a real JupyterHub
application in this process (``User.spawn()``, its database, tokens and settings):

1. in the hub: ``JupyterHub.spawner_class`` is KubeSpawner (a subclass that only records
   which of its attributes are read), its ``user`` and ``hub`` wrapped to record reads;
2. through the Outpost: ``JupyterHub.spawner_class`` is OutpostSpawner, which sends the
   start over gRPC to a real Outpost in this process hosting KubeSpawner (the hosting
   path: stand-in user and hub, allow_user_options, allow_override, flavors).

Both starts run until KubeSpawner's pod create, which the fake holds: there the live
Spawner's manifests (``get_pod_manifest()``, ``get_pvc_manifest()``,
``get_service_manifest()``) and attributes are taken, and the objects it sent to the API
(PVC, pod). Then the fake refuses the pod, and the user's error is compared too.
Objects are compared field by field; the fields that differ by design are listed in
BY_DESIGN with the reason, and a listed field that no longer differs fails the test too.
"""

from __future__ import annotations

import asyncio
import base64
import copy

import pytest
from kubernetes_asyncio.client import ApiClient
from traitlets.config import Config

from outpost_client.spawner import OutpostSpawner
from outpost_server.hosting import StandInHub, StandInUser

from .harness.kube import NAMESPACE, POD_REFUSAL, ReadRecorder, fake_kubernetes, hub_user, in_process_hub

pytestmark = pytest.mark.rpc

IMAGE = "quay.io/jupyter/base-notebook:2025-01-06"

#: KubeSpawner's configuration, the same in the hub (c.KubeSpawner) and at the site
KUBE = {
    "namespace": NAMESPACE,
    "image": IMAGE,
    "storage_pvc_ensure": True,
    "storage_capacity": "5Gi",
    "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": "{pvc_name}"}}],
    "volume_mounts": [{"name": "home", "mountPath": "/home/jovyan"}],
    "extra_labels": {"site-user": "{username}"},
    "extra_annotations": {"server": "{user_server}"},
    "environment": {"GREETING": "hello {username} on {servername}"},
    "cpu_limit": 1.0,
    "mem_limit": "2G",
    "start_timeout": 60,
    "profile_list": [
        {"display_name": "Small", "slug": "small", "default": True},
        {
            "display_name": "GPU",
            "slug": "gpu",
            "kubespawner_override": {
                "extra_resource_limits": {"nvidia.com/gpu": "1"},
                "node_selector": {"accelerator": "gpu"},
                "environment": {"PROFILE": "gpu"},
            },
            "profile_options": {
                "image": {
                    "display_name": "Image",
                    "choices": {
                        "base": {"display_name": "Base", "kubespawner_override": {"image": IMAGE}},
                        "torch": {
                            "display_name": "PyTorch",
                            "kubespawner_override": {"image": "quay.io/jupyter/pytorch-notebook:2025-01-06"},
                        },
                    },
                    "unlisted_choice": {
                        "enabled": True,
                        "display_name": "Other image",
                        "validation_regex": "^quay\\.io/jupyter/.+$",
                        "kubespawner_override": {"image": "{value}"},
                    },
                },
            },
        },
    ],
}

#: a flavor at the site ...
FLAVOR = {"display_name": "Large", "config": {"cpu_limit": 8.0, "mem_limit": "32G", "tolerations": [
    {"key": "large", "operator": "Exists", "effect": "NoSchedule"}]}}  # fmt: skip

# What differs by design between the hub's KubeSpawner and the hosted one, with the reason.
# Paths are of the flattened objects (see flatten); env entries by variable name.
TOKEN_REASON = "a fresh API token per start: the hub made one for each of the two starts"
BY_DESIGN = {
    "spec.containers[0].env.JUPYTERHUB_API_TOKEN.value": TOKEN_REASON,
    "spec.containers[0].env.JPY_API_TOKEN.value": TOKEN_REASON,
    "spec.containers[0].env.JUPYTERHUB_OUTPOST_START": (
        "added by the Outpost to the notebook's env: a restarted Outpost finds its notebooks by "
        "it (outpost_server/orphans.py)"
    ),
}
#: Spawner attributes read during start() whose values differ by design
ATTRS_BY_DESIGN = {
    "api_token": TOKEN_REASON,
    "user": "the hub's User in the hub; StandInUser at the site (their reads are compared on their own)",
    "hub": "the hub's Hub in the hub; StandInHub at the site (their reads are compared on their own)",
    "db": "the hub's database session in the hub; StandInDatabase at the site (commit does nothing)",
    "orm_spawner": "the hub's ORM row in the hub; none at the site (the Outpost keeps its own record)",
    "server": "the hub's Server row in the hub; a Server object with the same base_url at the site",
    "log": "the hub's logger in the hub; the Outpost's redacting one per server at the site",
    "config": "the hub's whole config in the hub; the Outpost's at the site (KubeSpawner's section is the same)",
    "parent": "None in the hub; None at the site -- compared only as None",
}


class _Serializer:
    """ApiClient's serialization without an ApiClient (which opens an HTTP session)."""

    PRIMITIVE_TYPES = ApiClient.PRIMITIVE_TYPES
    sanitize_for_serialization = ApiClient.sanitize_for_serialization


def plain(obj):
    """A Kubernetes object (V1Pod, ...) as the JSON the API server would receive."""
    return _Serializer().sanitize_for_serialization(obj)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{path: leaf}; a list of dicts that all have a "name" is keyed by name (env, volumes)."""
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "name" in x for x in obj):
        names = [x["name"] for x in obj]
        if len(set(names)) == len(names) and not prefix.endswith("containers"):
            for item in obj:
                rest = {k: v for k, v in item.items() if k != "name"}
                out.update(flatten(rest, f"{prefix}.{item['name']}") or {f"{prefix}.{item['name']}": {}})
            return out
        for i, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}[{i}]"))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out.update(flatten(item, f"{prefix}[{i}]"))
        if not obj:
            out[prefix] = []
    else:
        out[prefix] = obj
    return out


def differences(in_hub, hosted) -> dict[str, tuple]:
    a, b = flatten(plain(in_hub)), flatten(plain(hosted))
    return {
        k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    }


def assert_same_but_by_design(in_hub, hosted, what: str) -> None:
    diff = differences(in_hub, hosted)
    # an entry absent on one side appears under its leaves: group them by the listed path
    unexplained = {
        k: v for k, v in diff.items() if not any(k == p or k.startswith(p + ".") for p in BY_DESIGN)
    }
    assert not unexplained, f"{what}: the hosted KubeSpawner differs from the hub's in {unexplained}"


def assert_by_design_differences_still_differ(in_hub, hosted) -> None:
    diff = differences(in_hub, hosted)
    stale = [p for p in BY_DESIGN if not any(k == p or k.startswith(p + ".") for k in diff)]
    assert not stale, f"listed in BY_DESIGN but no longer different: {stale}"


class RecordingKubeSpawner:
    """Mixed in front of KubeSpawner in the hub: records the names of attributes read."""

    _reads: set[str] | None = None

    def __getattribute__(self, name):
        reads = object.__getattribute__(self, "__dict__").get("_reads")
        if reads is not None:
            reads.add(name)
        return object.__getattribute__(self, name)


def recording_kubespawner():
    from kubespawner import KubeSpawner

    return type("KubeSpawner", (RecordingKubeSpawner, KubeSpawner), {"__module__": KubeSpawner.__module__})


@pytest.fixture
async def hub(monkeypatch, tmp_path):
    """(JupyterHub application, fake Kubernetes API): the hub's config with KUBE."""
    with fake_kubernetes(monkeypatch, tmp_path) as api:
        cfg = Config()
        cfg.JupyterHub.db_url = "sqlite:///:memory:"
        cfg.JupyterHub.allow_named_servers = True
        cfg.JupyterHub.authenticator_class = "dummy"
        cfg.JupyterHub.cookie_secret = b"k" * 32
        cfg.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
        for key, value in KUBE.items():
            cfg.KubeSpawner[key] = copy.deepcopy(value)
        app = await in_process_hub(cfg)
        yield app, api


async def until_pod_create(task: asyncio.Task, api) -> None:
    """Wait until the fake holds a pod create; fail with what the start raised instead."""
    held = asyncio.ensure_future(api.pod_created.wait())
    await asyncio.wait([task, held], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    held.cancel()
    assert api.pod_created.is_set(), f"the start ended before its pod create: {task.exception()!r}"


async def snapshot(spawner, api) -> dict:
    """What a live KubeSpawner (held at its pod create) built and sent."""
    from kubernetes_asyncio.client import V1OwnerReference

    owner = V1OwnerReference(api_version="v1", kind="Pod", name=spawner.pod_name, uid="uid-1")
    return {
        "sent_pod": api.bodies("create_namespaced_pod")[-1],
        "sent_pvcs": api.bodies("create_namespaced_persistent_volume_claim"),
        "pod": await spawner.get_pod_manifest(),
        "pvc": spawner.get_pvc_manifest(),
        "service": spawner.get_service_manifest(owner, 8888),
        "names": (
            spawner.pod_name,
            spawner.pvc_name,
            spawner.secret_name,
            spawner.dns_name,
            spawner.namespace,
        ),
        "user_options": dict(spawner.user_options),
        "calls": [name for name, _, _ in api.calls],
    }


async def spawn_in_hub(
    app, api, server: str, options: dict, reads: dict[str, set]
) -> tuple[dict, BaseException]:
    user = hub_user(app, "alice")
    if server not in user.orm_spawners:
        user._new_orm_spawner(server, server)
    # created as User.spawn() would (User._new_spawner), with recorders around user and hub
    spawner = user._new_spawner(
        server,
        spawner_class=recording_kubespawner(),
        user=ReadRecorder(user, reads["user"]),
        hub=ReadRecorder(app.hub, reads["hub"]),
    )
    spawner._reads = reads["spawner"]
    user.spawners[server] = spawner
    spawner._spawn_pending = True  # as the hub's spawn handler (BaseHandler.spawn_single_user) does
    task = asyncio.ensure_future(user.spawn(server, options=dict(options)))
    await until_pod_create(task, api)
    spawner._reads = None
    snap = await snapshot(spawner, api)
    snap["attrs"] = {
        name: getattr(spawner, name) for name in reads["spawner"] if attribute_value(spawner, name)
    }
    api.release()
    with pytest.raises(Exception) as failed:
        await task
    return snap, failed.value


async def spawn_through_outpost(app, api, op, server: str, options: dict, overrides: dict | None):
    app.tornado_settings["spawner_class"] = OutpostSpawner
    app.config.OutpostSpawner.outpost_address = op.address
    if overrides:
        app.config.OutpostSpawner.config_overrides = overrides
    user = hub_user(app, "alice")
    user.spawners.pop(server, None)
    api.reset()
    task = asyncio.ensure_future(user.spawn(server, options=dict(options)))
    await until_pod_create(task, api)
    remote = "alice--" + server if server else "alice"
    hosted = op.manager.records[("default", remote)].spawner
    snap = await snapshot(hosted, api)
    snap["attrs"] = {}
    snap["spawner"] = hosted
    api.release()
    with pytest.raises(Exception) as failed:
        await task
    return snap, failed.value


def attribute_value(spawner, name: str) -> bool:
    """Whether name is a public, non-method attribute (what start() read as a value)."""
    if name.startswith("_"):
        return False
    try:
        value = getattr(spawner, name)
    except Exception:
        return False
    return not callable(value) or name in ("profile_list", "uid", "gid")


C0 = "spec.containers[0]."
#: name -> (server name, user_options, the hub's config_overrides, with the site's flavor,
#: (a field of the pod, its value): what shows that the case's choice took effect)
CASES = {
    # default server, the default profile
    "default-server": ("", {}, None, False, (C0 + "image", IMAGE)),
    # a named server, a profile and one of its choices
    "profile-choice": ("gpu", {"profile": "gpu", "image": "torch"}, None, False,
                       (C0 + "image", "quay.io/jupyter/pytorch-notebook:2025-01-06")),
    # an unlisted choice (a value the user typed, checked by the profile's regex)
    "unlisted-choice": ("gpu", {"profile": "gpu", "image--unlisted-choice": "quay.io/jupyter/r-notebook:2025-01-06"},
                        None, False, (C0 + "image", "quay.io/jupyter/r-notebook:2025-01-06")),
    # what the hub configures for this KubeSpawner: in the hub its config, through the
    # Outpost its config_overrides (allowed by the site)
    "allowed-overrides": ("big", {"profile": "small"}, {"cpu_limit": 2.0, "mem_limit": "4G", "image_pull_policy": "Always"},
                          False, (C0 + "imagePullPolicy", "Always")),
    # the site's flavor through the Outpost; the same traits as the hub's config in the hub
    "flavor": ("big", {}, None, True, (C0 + "resources.limits.cpu", 8.0)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
async def test_kubespawner_hosted_builds_the_same_objects_as_in_the_hub(case, hub, start_outpost):
    server, options, overrides, flavor, (field, expected) = CASES[case]
    app, api = hub
    reads = {"user": set(), "hub": set(), "spawner": set()}
    if overrides:
        for key, value in overrides.items():
            app.config.KubeSpawner[key] = value
    if flavor:
        for key, value in FLAVOR["config"].items():
            app.config.KubeSpawner[key] = copy.deepcopy(value)
    in_hub, hub_error = await spawn_in_hub(app, api, server, options, reads)
    # the site: the same KubeSpawner config; what a hub may send is allowed explicitly
    site = {f"KubeSpawner.{key}": copy.deepcopy(value) for key, value in KUBE.items()}
    traits = dict(allow_user_options=["profile", "image", "image--unlisted-choice"])
    if overrides:
        traits["allow_override"] = sorted(overrides)
    if flavor:
        traits["flavors"] = {"large": copy.deepcopy(FLAVOR)}
        options = dict(options, flavor="large")
    async with start_outpost("kubespawner.KubeSpawner", **traits, **site) as op:
        hosted, outpost_error = await spawn_through_outpost(app, api, op, server, options, overrides)

    assert flatten(plain(hosted["sent_pod"]))[field] == expected  # the case's choice took effect
    # the pod and PVC sent to the API, and what the manifest methods build
    assert_same_but_by_design(in_hub["sent_pod"], hosted["sent_pod"], "the pod sent")
    assert_by_design_differences_still_differ(in_hub["sent_pod"], hosted["sent_pod"])
    assert_same_but_by_design(in_hub["pod"], hosted["pod"], "get_pod_manifest()")
    assert len(in_hub["sent_pvcs"]) == len(hosted["sent_pvcs"]) == 1
    assert_same_but_by_design(in_hub["sent_pvcs"][0], hosted["sent_pvcs"][0], "the PVC sent")
    assert_same_but_by_design(in_hub["pvc"], hosted["pvc"], "get_pvc_manifest()")
    assert_same_but_by_design(in_hub["service"], hosted["service"], "get_service_manifest()")
    assert in_hub["names"] == hosted["names"]  # pod, PVC, secret, DNS name and namespace
    assert in_hub["calls"] == hosted["calls"]  # the same API calls, in the same order
    options.pop("flavor", None)
    assert in_hub["user_options"] == hosted["user_options"] == options
    # the user reads the same refusal (in the hub, JupyterHub's User.spawn() sets the
    # exception's reason to "error", which ApiException's message shows in its Reason line)
    refusal = POD_REFUSAL.format(name=in_hub["names"][0])
    assert refusal in str(hub_error) and refusal in str(outpost_error)
    assert str(outpost_error).startswith("(403)\nReason: Forbidden\n")

    # every Spawner attribute KubeSpawner read in the hub: the hosted one has it, equal
    hosted_spawner = hosted["spawner"]
    unequal = {}
    for name, value in in_hub["attrs"].items():
        if name in ATTRS_BY_DESIGN:
            continue
        assert hasattr(hosted_spawner, name), f"the hosted KubeSpawner has no {name}"
        if getattr(hosted_spawner, name) != value:
            unequal[name] = (value, getattr(hosted_spawner, name))
    assert not unequal, f"Spawner attributes KubeSpawner read differ (in the hub, hosted): {unequal}"
    assert hosted_spawner.server.base_url == f"/user/alice/{server + '/' if server else ''}"
    assert hosted_spawner.orm_spawner is None and hosted_spawner.parent is None

    # every attribute read on the hub's user and hub objects: the stand-ins have it, equal
    user = hub_user(app, "alice")
    assert reads["user"] and reads["hub"]
    for name in reads["user"]:
        assert hasattr(hosted_spawner.user, name), f"StandInUser has no {name} (KubeSpawner reads it)"
        if name in ("name", "id", "admin", "url", "escaped_name"):
            assert getattr(hosted_spawner.user, name) == getattr(user, name), f"user.{name} differs"
    assert [g.name for g in hosted_spawner.user.groups] == [g.name for g in user.groups]
    for name in reads["hub"]:
        assert hasattr(hosted_spawner.hub, name), f"StandInHub has no {name} (KubeSpawner reads it)"
        assert getattr(hosted_spawner.hub, name) == getattr(app.hub, name), f"hub.{name} differs"


def test_kubespawner_reads_only_what_the_stand_ins_have():
    """A static check beside the recorded one: the user and hub attributes KubeSpawner's
    source names (self.user.X, self.hub.X) are all on StandInUser and StandInHub."""
    import inspect
    import re

    import kubespawner.spawner
    from jupyterhub import spawner as base

    names = {"user": set(), "hub": set()}
    for module in (kubespawner.spawner, base):
        for kind, attr in re.findall(r"self\.(user|hub)\.([A-Za-z_]+)", inspect.getsource(module)):
            names[kind].add(attr)
    assert "name" in names["user"] and "public_host" in names["hub"]
    user = StandInUser(name="alice")
    hub = StandInHub()
    # the base Spawner's auth-state and ORM-only reads are not KubeSpawner's start()
    not_hosted = {"get_auth_state", "orm_user", "server", "spawner", "settings"}
    missing = sorted(f"user.{n}" for n in names["user"] - not_hosted if not hasattr(user, n))
    missing += sorted(f"hub.{n}" for n in names["hub"] if not hasattr(hub, n))
    assert not missing, missing


def test_kubespawner_as_the_charts_default_spawner_class_loads():
    """The Helm chart's default spawnerClass is what c.Outpost.spawner_class resolves to
    KubeSpawner (KubeSpawner registers no jupyterhub.spawners name: "kubespawner" is the
    module, which the Outpost refuses at start-up)."""
    import yaml
    from kubespawner import KubeSpawner

    from outpost_server.app import Outpost

    from .harness.outpost import ROOT

    values = yaml.safe_load((ROOT / "helm/jupyterhub-outpost/values.yaml").read_text())
    cfg = Config()
    cfg.Outpost.spawner_class = values["outpost"]["spawnerClass"]
    assert Outpost(config=cfg).spawner_class is KubeSpawner


async def test_kubespawner_hosted_with_internal_ssl_builds_its_certificate_secret(monkeypatch, tmp_path):
    """internal_ssl: the hosted KubeSpawner's Secret (made before its pod) carries the
    certificates the hub sent with Start; its trust bundle file has the hub's CA bundle."""
    from kubespawner import KubeSpawner
    from kubernetes_asyncio.client import V1OwnerReference

    from outpost_server.hosting import install_certificates, make_spawner, stand_ins_from_env

    with fake_kubernetes(monkeypatch, tmp_path):
        user, hub_ = stand_ins_from_env(env={}, user_name="alice", user_id=7, admin=False, groups=[])
        spawner = make_spawner(
            KubeSpawner, config=Config({"KubeSpawner": {"namespace": NAMESPACE}}), spawner_name="", user=user,
            hub=hub_, env={}, user_options={}, site_env_keys=frozenset(),
        )  # fmt: skip
        certs = {"key_pem": "KEY\n", "cert_pem": "CERT\n", "ca_pem": "NOTEBOOKS-CA-TRUST\n"}
        await install_certificates(spawner, certs, tmp_path / "certs", "one")
        owner = V1OwnerReference(
            api_version="v1", kind="Pod", name=spawner.pod_name, uid="u", controller=True
        )
        secret = spawner.get_secret_manifest(owner)
        data = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
        assert data["ssl.key"] == "KEY\n" and data["ssl.crt"] == "CERT\n"
        assert "NOTEBOOKS-CA-TRUST" in data["notebooks-ca_trust.crt"]
        assert secret.metadata.name == spawner.secret_name
