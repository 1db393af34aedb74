# The demo's JupyterHub: http://127.0.0.1:8000, any user name logs in (DummyAuthenticator),
# and every server starts through the demo Outpost (OutpostSpawner), reached through an
# SSH tunnel to the Outpost's embedded forwarder. demo/run.sh starts both.
import os

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
data = os.environ.get("OUTPOST_DEMO_DATA") or os.path.join(root, "demo-data")

c.JupyterHub.bind_url = "http://127.0.0.1:8000"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = 8081
c.JupyterHub.db_url = f"sqlite:///{data}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{data}/jupyterhub_cookie_secret"
c.JupyterHub.cleanup_servers = False  # notebooks outlive a hub restart
c.JupyterHub.allow_named_servers = True
c.ConfigurableHTTPProxy.pid_file = f"{data}/proxy.pid"
c.ConfigurableHTTPProxy.command = [os.path.join(root, "node_modules", ".bin", "configurable-http-proxy")]
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True

c.JupyterHub.spawner_class = "outpost"
c.OutpostSpawner.outpost_address = "127.0.0.1:50051"
c.OutpostSpawner.outpost_ca = f"{data}/certs/outpost-ca/outpost-ca.crt"  # mTLS (demo/run.sh)
c.OutpostSpawner.outpost_cert = f"{data}/certs/default/default.crt"
c.OutpostSpawner.outpost_key = f"{data}/certs/default/default.key"
c.OutpostSpawner.ssh_host = "127.0.0.1"
c.OutpostSpawner.ssh_port = 2222
c.OutpostSpawner.ssh_key = f"{data}/hub_ssh_key"
c.OutpostSpawner.ssh_known_hosts = f"{data}/known_hosts"
c.OutpostSpawner.hub_api_forward = True
c.OutpostSpawner.hub_api_site_port = 18081
# the spawn form (made from the Outpost's flavors, each time it is shown): its label
c.OutpostSpawner.outpost_display_names = {"default": "Demo Outpost (127.0.0.1:50051)"}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60
