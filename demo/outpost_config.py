# The demo's Outpost: the "simple" Spawner (SimpleLocalProcessSpawner: any user name
# works, homes under demo-data/home) and SQLite, gRPC on 127.0.0.1:50051, and the
# embedded SSH forwarder on 127.0.0.1:2222 for the demo hub (demo/jupyterhub_config.py).
#
# Servers started by the hub run jupyterhub-singleuser (JupyterLab when it is installed).
# Servers started by hand with grpcurl have no hub to talk to, so for them (no
# JUPYTERHUB_CLIENT_ID in the request) the command is plain jupyter-server on the address the
# Spawner picked (JUPYTERHUB_SERVICE_URL), under the prefix asked for
# (JUPYTERHUB_SERVICE_PREFIX), with the request's JUPYTERHUB_API_TOKEN as its token.
import os
import sys

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

here = os.path.dirname(os.path.abspath(__file__))
data = os.environ.get("OUTPOST_DEMO_DATA") or os.path.join(os.path.dirname(here), "demo-data")
os.makedirs(data, exist_ok=True)

c.Outpost.ip = "127.0.0.1"
c.Outpost.port = 50051

# mTLS with the certificates demo/run.sh makes (jupyterhub-outpost generate-certs); the
# hub's certificate (CN "default") names the demo hub. Without them: plaintext on loopback,
# which every local user could use as the demo hub: an explicit opt-in, for a laptop only.
certs = os.path.join(data, "certs")
if os.path.exists(os.path.join(certs, "outpost-server", "outpost-server.crt")):
    c.Outpost.tls_cert = os.path.join(certs, "outpost-server", "outpost-server.crt")
    c.Outpost.tls_key = os.path.join(certs, "outpost-server", "outpost-server.key")
    c.Outpost.tls_client_ca = os.path.join(certs, "outpost-ca", "outpost-ca.crt")
    # only the demo hub: a hub's user then runs as the account of the same name ("{name}",
    # the default for one hub); with several hubs the site sets c.Outpost.user_mapping
    c.Outpost.allowed_hubs = ["default"]
else:
    c.Outpost.allow_unauthenticated = True
c.Outpost.spawner_class = "simple"
c.Outpost.db_url = f"sqlite:///{data}/outpost.sqlite"
c.Outpost.state_dir = data  # its own files (internal_ssl certificates) beside the database

# the key that encrypts env (API tokens) and Spawner state in the database: made on first
# use, mode 0600, and kept in demo-data (deleting it makes the stored servers unreadable)
crypt_key_file = os.path.join(data, "outpost_crypt_key")
if not os.path.exists(crypt_key_file):
    from cryptography.fernet import Fernet

    fd = os.open(crypt_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(Fernet.generate_key().decode() + "\n")
c.Outpost.crypt_key_file = crypt_key_file
c.Outpost.poll_interval = 10
c.Outpost.start_message = "Demo Outpost (127.0.0.1:50051): starting a server for {user} with {spawner_class}"

# Two flavors (docs/flavors.md): the hub's spawn form lists them with their usage.
# "small" is the default (a start without a flavor gets it), 3 per user; "large" allows
# only 2 servers at a time in all: a third (a named server, or another user) is refused
# with a sentence on the spawn page. Each stops after its runtime. (The simple Spawner
# does not enforce cpu_limit and mem_limit; it hands them to the notebook as CPU_LIMIT and
# MEM_LIMIT, where a batch or Kubernetes Spawner would reserve them.)
c.Outpost.flavors = {
    "small": {
        "display_name": "Small: 1 CPU, 1 GB, 8 hours",
        "description": "The default. Up to 3 per user.",
        "config": {"cpu_limit": 1.0, "mem_limit": "1G"},
        "max_per_user": 3,
        "max_runtime": 8 * 3600,
        "weight": 0,
        "default": True,
    },
    "large": {
        "display_name": "Large: 2 CPU, 2 GB, 30 minutes",
        "description": "Only 2 at a time on this Outpost, for everyone together.",
        "config": {"cpu_limit": 2.0, "mem_limit": "2G"},
        "max_total": 2,
        "max_runtime": 30 * 60,
        "weight": 10,
    },
}

c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(data, "home", "{username}")
bindir = os.path.dirname(sys.executable)
c.SimpleLocalProcessSpawner.cmd = [
    "/bin/sh",
    "-c",
    'if [ -n "$JUPYTERHUB_CLIENT_ID" ]; then exec "$1/jupyterhub-singleuser" --allow-root; fi;'
    ' port=${JUPYTERHUB_SERVICE_URL##*:}; port=${port%%/*}; exec "$1/jupyter-server" --allow-root'
    ' --ServerApp.ip=127.0.0.1 --ServerApp.port="$port"'
    ' --ServerApp.base_url="$JUPYTERHUB_SERVICE_PREFIX"'
    ' --IdentityProvider.token="$JUPYTERHUB_API_TOKEN" --ServerApp.open_browser=False',
    "outpost-demo-notebook",
    bindir,
]

# the SSH forwarder the demo hub tunnels through (its key is made by demo/run.sh)
hub_key = os.path.join(data, "hub_ssh_key.pub")
c.SSHForwarder.enabled = os.path.exists(hub_key)
c.SSHForwarder.ip = "127.0.0.1"
c.SSHForwarder.port = 2222
c.SSHForwarder.host_key_file = os.path.join(data, "outpost_ssh_host_key")
c.SSHForwarder.authorized_keys = {"default": [hub_key]} if os.path.exists(hub_key) else {}
c.SSHForwarder.reverse_listen = {"default": ["127.0.0.1:18081"]}
