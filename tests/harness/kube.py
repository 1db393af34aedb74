"""KubeSpawner without a cluster: what tests/test_kubespawner_parity.py runs it against.

No Kubernetes API server runs on the test machines, so KubeSpawner (the real one, from
PyPI) is given:

- a kubeconfig naming an API server that is not there (:func:`write_kubeconfig`), so its
  own ``load_config()`` runs as at a site;
- :class:`FakeCoreV1Api` in place of the ``CoreV1Api`` client (a fault-injection fake: it
  records every call with its arguments; a PVC create is accepted, a pod create is
  held until the test releases it and then refused as a quota error would be, deletes
  answer 404, anything else raises :class:`InjectedFault`);
- :class:`LoadedReflector` in place of the shared pod and event watches (a hub starts them
  once and shares them; here they are loaded and empty).

:func:`fake_kubernetes` installs all three. :func:`in_process_hub` is a real JupyterHub
application (``JupyterHub.initialize()``: its database, users, roles, tornado settings),
not started (no proxy, no HTTP server): what ``User.spawn()`` needs to create and start a
Spawner exactly as a hub does. :class:`ReadRecorder` wraps an object and records which of
its attributes are read.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

#: the namespace the tests' KubeSpawner works in
NAMESPACE = "jhub-site"

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: "https://127.0.0.1:9", insecure-skip-tls-verify: true}
users:
- name: outpost
  user: {token: not-a-real-token}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: outpost, namespace: jhub-site}
current-context: nowhere
"""

#: what the fake answers a pod create with, once released (a quota refusal, as a site sees one)
POD_REFUSAL = 'pods "{name}" is forbidden: exceeded quota: user-quota (injected fault)'


def write_kubeconfig(directory: Path) -> Path:
    path = directory / "kubeconfig"
    path.write_text(KUBECONFIG)
    return path


class InjectedFault(Exception):
    """A Kubernetes API call the fake does not answer."""


class FakeCoreV1Api:
    """The ``CoreV1Api`` client KubeSpawner gets from ``shared_client``; see the module."""

    def __init__(self):
        #: (method name, args, kwargs) of every call, in order
        self.calls: list[tuple[str, tuple, dict]] = []
        #: set when a pod create arrives; cleared by :meth:`release`
        self.pod_created = asyncio.Event()
        self._release = asyncio.Event()

    def bodies(self, method: str) -> list:
        """The objects passed to every call of method (create_namespaced_pod: the pod)."""
        out = []
        for name, args, kwargs in self.calls:
            if name == method:
                out.append(kwargs["body"] if "body" in kwargs else args[1])
        return out

    def release(self) -> None:
        """Let the held pod create fail (with POD_REFUSAL)."""
        self._release.set()

    def reset(self) -> None:
        self.calls.clear()
        self.pod_created = asyncio.Event()
        self._release = asyncio.Event()

    async def create_namespaced_persistent_volume_claim(self, *args, **kwargs):
        self.calls.append(("create_namespaced_persistent_volume_claim", args, kwargs))
        return kwargs.get("body")

    async def create_namespaced_pod(self, *args, **kwargs):
        from kubernetes_asyncio.client.rest import ApiException

        self.calls.append(("create_namespaced_pod", args, kwargs))
        pod = kwargs["body"] if "body" in kwargs else args[1]
        self.pod_created.set()
        await self._release.wait()
        error = ApiException(status=403, reason="Forbidden")
        error.body = POD_REFUSAL.format(name=pod.metadata.name)
        raise error

    async def _not_found(self, name, args, kwargs):
        from kubernetes_asyncio.client.rest import ApiException

        self.calls.append((name, args, kwargs))
        raise ApiException(status=404, reason="Not Found")

    def __getattr__(self, name: str):
        if name.startswith("delete_namespaced_"):
            return lambda *args, **kwargs: self._not_found(name, args, kwargs)

        async def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            raise InjectedFault(f"the fake Kubernetes API does not answer {name}")

        if name.startswith("_"):
            raise AttributeError(name)
        return call


class LoadedReflector:
    """A shared pod or event watch that has loaded and seen nothing."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.first_load_future = loop.create_future()
        self.first_load_future.set_result(None)
        self.pods: dict = {}
        self.events: list = []
        self.resources: dict = {}

    async def stop(self):
        pass


@contextmanager
def fake_kubernetes(monkeypatch, tmp_path: Path):
    """Install the kubeconfig, the fake API and loaded reflectors; yield the fake."""
    import kubernetes_asyncio.config.kube_config
    import kubespawner.clients
    import kubespawner.spawner
    from kubespawner import KubeSpawner

    # read from $KUBECONFIG when kubernetes_asyncio is imported: set it where it is kept
    kubeconfig = str(write_kubeconfig(tmp_path))
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    monkeypatch.setattr(kubernetes_asyncio.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubespawner.clients.load_config.cache_clear()
    api = FakeCoreV1Api()
    monkeypatch.setattr(kubespawner.spawner, "shared_client", lambda *a, **kw: api)
    saved = dict(KubeSpawner.reflectors)
    KubeSpawner.reflectors.clear()
    KubeSpawner.reflectors[("pods", NAMESPACE)] = LoadedReflector()
    KubeSpawner.reflectors[("events", NAMESPACE)] = LoadedReflector()
    try:
        yield api
    finally:
        api.release()
        KubeSpawner.reflectors.clear()
        KubeSpawner.reflectors.update(saved)
        kubespawner.clients.load_config.cache_clear()


async def in_process_hub(config):
    """A JupyterHub application, initialized (not started) with config."""
    from jupyterhub.app import JupyterHub

    app = JupyterHub(config=config)
    await app.initialize([])
    return app


def hub_user(app, name: str):
    """The hub's User for name (created in the hub's database if new)."""
    from jupyterhub import orm

    orm_user = orm.User.find(app.db, name)
    if orm_user is None:
        orm_user = orm.User(name=name)
        app.db.add(orm_user)
        app.db.commit()
    return app.users[orm_user]


class ReadRecorder:
    """``ReadRecorder(obj, seen)`` behaves as obj and adds the name of every attribute read
    through it to the set seen (reads of obj's own methods on itself are not seen)."""

    def __init__(self, target, seen: set[str]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._target, name)

    def __setattr__(self, name, value):
        setattr(self._target, name, value)
