# The demo's Outpost: the "simple" Spawner (SimpleLocalProcessSpawner: any user name
# works, homes under demo-data/home) and SQLite, on 127.0.0.1:50051.
#
# The notebook is a real Jupyter server. JupyterHub's usual command,
# jupyterhub-singleuser, needs a hub to talk to; this demo has none, so it runs
# jupyter-server directly on the address the Spawner picked (JUPYTERHUB_SERVICE_URL)
# and under the prefix the hub asked for (JUPYTERHUB_SERVICE_PREFIX), with the
# JUPYTERHUB_API_TOKEN of the Start request as its token.
import os
import sys

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

here = os.path.dirname(os.path.abspath(__file__))
data = os.environ.get("OUTPOST_DEMO_DATA") or os.path.join(os.path.dirname(here), "demo-data")
os.makedirs(data, exist_ok=True)
jupyter_server = os.path.join(os.path.dirname(sys.executable), "jupyter-server")

c.Outpost.ip = "127.0.0.1"
c.Outpost.port = 50051
c.Outpost.spawner_class = "simple"
c.Outpost.db_url = f"sqlite:///{data}/outpost.sqlite"
c.Outpost.poll_interval = 10

c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(data, "home", "{username}")
c.SimpleLocalProcessSpawner.cmd = [
    "/bin/sh",
    "-c",
    'port=${JUPYTERHUB_SERVICE_URL##*:}; port=${port%%/*}; exec "$0" --allow-root'
    ' --ServerApp.ip=127.0.0.1 --ServerApp.port="$port"'
    ' --ServerApp.base_url="$JUPYTERHUB_SERVICE_PREFIX"'
    ' --IdentityProvider.token="$JUPYTERHUB_API_TOKEN" --ServerApp.open_browser=False',
    jupyter_server,
]
