"""The Helm chart (helm/jupyterhub-outpost/) with the real helm: `helm lint --strict` and
`helm template` with every values file in the chart's ci/ directory and with every yaml
block of docs/deploy.md's "Helm chart" section, each rendered manifest validated against
the Kubernetes JSON schemas offline (kubernetes-validate, strict), and the generated
outpost_config.py loaded into the Outpost. helm comes from scripts/install-helm.sh (an
npm package, cached under node_modules/.cache/helm)."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from cryptography.fernet import Fernet
from grpc_health.v1 import health_pb2, health_pb2_grpc
from traitlets.config import PyFileConfigLoader

from outpost_client.errors import Unavailable

from outpost_server.app import Outpost
from outpost_server.certs import generate_certs
from outpost_server.forwarder import SSHForwarder

from .harness.hub import hub_client
from .harness.outpost import OUTPOST_BIN, ROOT, outpost_env
from .harness.util import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHART = ROOT / "helm" / "jupyterhub-outpost"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
HEALTH_SERVICE = "jupyterhub.outpost.v1.OutpostService"


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    """Run helm (installed by the project's script) with its homes in a temp dir."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"scripts/install-helm.sh failed:\n{out.stderr}"
    binary = out.stdout.strip().splitlines()[-1]
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for name in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{name}_HOME"] = str(home / name.lower())

    def run(*args, check=True):
        result = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    return run


def render(helm, *args) -> list[dict]:
    out = helm("template", "outpost", str(CHART), "--kube-version", KUBE_VERSION, *args)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate(docs: list[dict]) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def one(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_text(docs: list[dict]) -> str:
    return one(docs, "ConfigMap")["data"]["outpost_config.py"]


def load_config(docs: list[dict], tmp_path: Path, monkeypatch):
    """The generated outpost_config.py as the Outpost reads it, applied to an Outpost and an
    SSHForwarder (a trait that does not exist or a value of the wrong type fails here)."""
    path = tmp_path / "outpost_config.py"
    path.write_text(config_text(docs))
    monkeypatch.setenv("OUTPOST_DB_URL", "postgresql://outpost@db.example.org/outpost")
    cfg = PyFileConfigLoader(path.name, path=str(tmp_path)).load_config()
    if cfg.Outpost.db_url.startswith("postgresql"):
        assert "OUTPOST_DB_URL" not in os.environ, "the config takes the database URL out of the environment"
    monkeypatch.delenv("OUTPOST_DB_URL", raising=False)
    for section, cls in (("Outpost", Outpost), ("SSHForwarder", SSHForwarder)):
        unknown = set(cfg[section]) - set(cls.class_trait_names(config=True))
        assert not unknown, f"{section} has no options {unknown}"
    assert cfg.Outpost.spawner_class == "kubespawner.KubeSpawner"
    app = Outpost(config=cfg)
    assert app.spawner_class.__name__ == "KubeSpawner"  # resolved (the test extra installs it)
    forwarder = SSHForwarder(config=cfg)
    return app, forwarder


def docs_examples() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("\n## Helm chart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


# --- helm lint, and the schemas ------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_lints_strict_and_renders_valid_manifests(helm, values):
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in out.stdout
    docs = render(helm, "-f", str(values))
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "Secret", "ConfigMap", "Role"}
    validate(docs)


def test_docs_examples_render_valid_manifests_and_config(helm, tmp_path, monkeypatch):
    examples = docs_examples()
    assert len(examples) >= 2, "docs/deploy.md's Helm chart section lost its values examples"
    for i, example in enumerate(examples):
        values = tmp_path / f"example-{i}.yaml"
        values.write_text(example)
        docs = render(helm, "-f", str(values))
        validate(docs)
        app, _ = load_config(docs, tmp_path, monkeypatch)
        assert app.tls_enabled
        probes = container(docs)
        assert probes["readinessProbe"]["grpc"]["port"] == app.health_port


def test_schema_validation_catches_a_wrong_field(helm):
    # the check above would notice a manifest Kubernetes rejects
    docs = render(helm, "-f", str(CI_VALUES[0]))
    container(docs)["securityContext"]["readOnlyRootFileSystem"] = True  # typo: FileSystem
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(one(docs, "Deployment"), KUBE_VERSION, strict=True)


# --- what the manifests say ----------------------------------------------------------------


def test_deployment_is_one_non_root_read_only_pod_with_grpc_probes(helm, tmp_path, monkeypatch):
    docs = render(helm, "-f", str(CHART / "ci" / "mtls-sqlite-values.yaml"))
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = container(docs)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # writable: the state volume (also the working directory) and /tmp, nothing else
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
    assert {m["mountPath"] for m in writable} == {c["workingDir"], "/tmp"}
    state = next(m for m in writable if m["mountPath"] == c["workingDir"])
    assert volumes[state["name"]]["persistentVolumeClaim"]["claimName"] == one(
        docs, "PersistentVolumeClaim"
    )["metadata"]["name"]
    # native gRPC probes on the plaintext health-only port the config turns on
    app, forwarder = load_config(docs, tmp_path, monkeypatch)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == app.health_port
    assert c["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert app.health_ip == "0.0.0.0" and app.port == 50051
    # mTLS from the existing Secret; SQLite on the state volume
    assert app.tls_client_ca.endswith("/tls/ca.crt")
    assert volumes["tls"]["secret"]["secretName"] == "outpost-tls"
    assert app.db_url == f"sqlite:///{c['workingDir']}/outpost.sqlite"
    assert forwarder.enabled and forwarder.host_key_file.startswith(c["workingDir"] + "/")
    # the Service: gRPC and SSH, not the health port
    ports = {p["name"]: p["port"] for p in one(docs, "Service")["spec"]["ports"]}
    assert ports == {"grpc": 50051, "ssh": 2222}
    # the key from the values, handed over in the environment
    secret = one(docs, "Secret")
    Fernet(base64.b64decode(secret["data"]["crypt-key"]))
    (env,) = [e for e in c["env"] if e["name"] == "OUTPOST_CRYPT_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "crypt-key"}


def test_metrics_on_opens_the_port_in_config_pod_and_service(helm, tmp_path, monkeypatch):
    values = ("-f", str(CHART / "ci" / "mtls-sqlite-values.yaml"))
    off = render(helm, *values)
    assert "metrics_port" not in config_text(off)
    assert "prometheus.io/scrape" not in one(off, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    docs = render(helm, *values, "--set", "metrics.enabled=true", "--set", "metrics.port=9123")
    validate(docs)
    app, _ = load_config(docs, tmp_path, monkeypatch)
    assert (app.metrics_ip, app.metrics_port) == ("0.0.0.0", 9123)
    c = container(docs)
    assert {"name": "metrics", "containerPort": 9123} in c["ports"]
    service = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    assert service["metrics"]["port"] == 9123 and service["metrics"]["targetPort"] == "metrics"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9123"


def test_existing_secrets_and_external_postgresql(helm, tmp_path, monkeypatch):
    docs = render(helm, "-f", str(CHART / "ci" / "tokens-postgresql-values.yaml"))
    validate(docs)
    assert not [doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"]
    # the chart's own Secret holds nothing: every secret is the site's
    assert not one(docs, "Secret").get("data")
    c = container(docs)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {
        "OUTPOST_CRYPT_KEY": {"name": "outpost-keys", "key": "crypt-key"},
        "OUTPOST_DB_URL": {"name": "outpost-db", "key": "url"},
    }
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]
    assert volumes["ssh-host-key"]["secret"]["secretName"] == "outpost-keys"
    assert [i["key"] for i in volumes["tls"]["secret"]["items"]] == ["tls.crt", "tls.key"]
    app, forwarder = load_config(docs, tmp_path, monkeypatch)
    assert app.db_url == "postgresql://outpost@db.example.org/outpost"
    assert app.tls_client_ca == "" and list(app.hub_tokens) == ["hub-a"]
    assert forwarder.host_key_file.endswith("/ssh/ssh_host_key")
    service = one(docs, "Service")["spec"]
    assert service["type"] == "LoadBalancer" and service["loadBalancerSourceRanges"] == ["192.0.2.0/24"]


def test_inline_pem_goes_into_the_charts_secret(helm, tmp_path):
    certs = generate_certs(str(tmp_path / "certs"), ["outpost.example.org"], ["hub-a"])
    key = Fernet.generate_key().decode()
    docs = render(
        helm,
        "--set-file", f"tls.cert={certs.server.cert}",
        "--set-file", f"tls.key={certs.server.key}",
        "--set-file", f"tls.clientCA={certs.ca.cert}",
        "--set", f"cryptKey.value={key}",
        "--set-json", 'outpost.userMapping="{hub}-{name}"',
    )  # fmt: skip
    assert 'c.Outpost.user_mapping = "{hub}-{name}"' in config_text(docs)
    validate(docs)
    data = one(docs, "Secret")["data"]
    assert base64.b64decode(data["tls.key"]).decode() == Path(certs.server.key).read_text()
    assert base64.b64decode(data["ca.crt"]).decode() == Path(certs.ca.cert).read_text()
    assert base64.b64decode(data["crypt-key"]).decode() == key


@pytest.mark.parametrize(
    "values, says",
    [
        ([], "tls: hubs reach the Outpost over TLS. Set tls.existingSecret"),
        (["tls.cert=x"], "tls: set tls.cert and tls.key together"),
        (["tls.cert=x", "tls.key=y"], "tls.clientCA: hubs authenticate with client certificates"),
        (["tls.existingSecret=t", "cryptKey.existingSecret=k", "tls.clientCertificates=false"], "outpost.hubTokens: with tls.clientCertificates: false"),
        (["tls.existingSecret=t"], "cryptKey: the database needs an encryption key: set cryptKey.existingSecret"),
        (["tls.existingSecret=t", "cryptKey.existingSecret=k"], "outpost.allowedHubs: with mTLS any hub whose certificate the CA signed can connect"),
        (["tls.existingSecret=t", "cryptKey.existingSecret=k", "outpost.allowedHubs={a}", "database.type=postgresql"], "database: type postgresql needs database.urlExistingSecret"),
        (["tls.existingSecret=t", "cryptKey.existingSecret=k", "outpost.allowedHubs={a}", "database.type=mysql"], 'database.type: "mysql" is neither sqlite nor postgresql'),
        (["tls.existingSecret=t", "cryptKey.existingSecret=k", "outpost.allowedHubs={a}", "persistence.enabled=false"], "persistence.enabled: false with SQLite"),
    ],
    ids=["no-tls", "cert-without-key", "mtls-without-ca", "no-client-auth", "no-crypt-key", "any-hub-without-user-mapping",
         "postgresql-without-url", "unknown-database", "sqlite-without-volume"],
)  # fmt: skip
def test_values_that_would_not_work_are_refused_with_what_to_set(helm, values, says):
    args = [arg for value in values for arg in ("--set", value)]
    out = helm("template", "outpost", str(CHART), *args, check=False)
    assert out.returncode != 0
    assert says in out.stderr


# --- the rendered pod's files run a real Outpost ------------------------------------------


async def test_rendered_config_and_secret_boot_a_real_outpost(helm, tmp_path):
    """What the pod would get (the ConfigMap's outpost_config.py, the Secret's TLS files and
    generated database key, the probes' port) run as the console script: the probe's plaintext
    health check answers SERVING for the readiness service while hubs need their certificate."""
    certs = generate_certs(str(tmp_path / "certs"), ["127.0.0.1"], ["hub-a"])
    grpc_port, health_port, ssh_port = free_port(), free_port(), free_port()
    docs = render(
        helm,
        "--set-file", f"tls.cert={certs.server.cert}",
        "--set-file", f"tls.key={certs.server.key}",
        "--set-file", f"tls.clientCA={certs.ca.cert}",
        "--set", f"outpost.grpcPort={grpc_port}",
        "--set", f"outpost.healthPort={health_port}",
        "--set", f"sshForwarder.port={ssh_port}",
        "--set", "outpost.spawnerClass=simple",
        "--set", "outpost.allowedHubs={hub-a}",
        "--set", f"cryptKey.value={Fernet.generate_key().decode()}",
    )  # fmt: skip
    c = container(docs)
    config_dir, state_dir = Path(c["args"][-1]).parent, c["workingDir"]
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "tls").mkdir(parents=True)
    state.mkdir(mode=0o700)
    secret = one(docs, "Secret")["data"]
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (etc / "tls" / name).write_bytes(base64.b64decode(secret[name]))
    (etc / "tls" / "tls.key").chmod(0o600)
    # the pod's paths and all-interfaces addresses, moved to this test's directory and loopback
    text = config_text(docs).replace(str(config_dir), str(etc)).replace(state_dir, str(state))
    (etc / "outpost_config.py").write_text(text.replace('"0.0.0.0"', '"127.0.0.1"'))
    env = outpost_env({"OUTPOST_CRYPT_KEY": base64.b64decode(secret["crypt-key"]).decode()})
    log = open(tmp_path / "outpost.log", "w")
    proc = subprocess.Popen(
        [str(OUTPOST_BIN), "-f", str(etc / "outpost_config.py")],
        cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    try:
        readiness = c["readinessProbe"]["grpc"]
        assert readiness["port"] == health_port

        async def serving():
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "outpost.log").read_text())
            try:
                return await check_health(health_port, readiness["service"]) == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                return False

        await wait_for(serving, timeout=60, message="the probe's health check never answered SERVING")
        async with hub_client(f"127.0.0.1:{grpc_port}", certs, certs.hubs["hub-a"]) as hub:
            assert await hub.list_servers() == []
        async with hub_client(f"127.0.0.1:{grpc_port}", certs, None) as stranger:
            with pytest.raises(Unavailable):
                await stranger.list_servers()
        assert (state / "ssh_host_key").exists()  # the forwarder's key, on the state volume
        with socket.create_connection(("127.0.0.1", ssh_port), timeout=5) as s:
            assert s.recv(4).startswith(b"SSH-")
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
    assert returncode == 0, (tmp_path / "outpost.log").read_text()
    assert (state / "outpost.sqlite").exists()


async def check_health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status
