#!/usr/bin/env bash
# make demo: the whole picture on 127.0.0.1 —
#   JupyterHub (any user name logs in) with the proxy   http://127.0.0.1:8000
#   an Outpost with the simple Spawner and SQLite        gRPC (mTLS) 127.0.0.1:50051
#   its embedded SSH forwarder, which the hub tunnels through   127.0.0.1:2222
# Ctrl-C stops the hub and the Outpost; running notebooks keep running and are picked up
# again by the next `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${OUTPOST_DEMO_DATA:-$PWD/demo-data}"
export OUTPOST_DEMO_DATA="$DATA"
mkdir -p "$DATA"
export PATH="$PWD/.venv/bin:$PWD/node_modules/.bin:$PATH"

# mTLS: a CA, the Outpost's certificate and the demo hub's ("default")
[ -d "$DATA/certs" ] || .venv/bin/jupyterhub-outpost generate-certs --out "$DATA/certs" \
  --host 127.0.0.1 --host localhost --hub default > "$DATA/generate-certs.log"

# the hub's SSH key, allowed at the Outpost's forwarder (demo/outpost_config.py)
[ -f "$DATA/hub_ssh_key" ] || ssh-keygen -q -t ed25519 -N '' -C demo-hub -f "$DATA/hub_ssh_key"

.venv/bin/jupyterhub-outpost -f demo/outpost_config.py > "$DATA/outpost.log" 2>&1 &
OUTPOST=$!
trap 'kill $OUTPOST 2>/dev/null; wait $OUTPOST 2>/dev/null' EXIT
for _ in $(seq 100); do
  grep -q "SSH forwarder listening" "$DATA/outpost.log" 2>/dev/null && break
  kill -0 $OUTPOST 2>/dev/null || { cat "$DATA/outpost.log"; exit 1; }
  sleep 0.1
done
echo "[127.0.0.1]:2222 $(cat "$DATA/outpost_ssh_host_key.pub")" > "$DATA/known_hosts"

C="$DATA/certs"
G=".venv/bin/grpcurl -cacert $C/outpost-ca/outpost-ca.crt -cert $C/default/default.crt -key $C/default/default.key"
A="127.0.0.1:50051"
S="jupyterhub.outpost.v1.OutpostService"
cat <<TXT

  Outpost demo
  ------------
  Open http://127.0.0.1:8000 , log in with any name (no password needed), pick a flavor
  and start your server: the spawn page shows the Outpost's progress messages, then
  JupyterHub sends you to your notebook, reached through an SSH tunnel to the Outpost.
  Flavor "large" allows only 2 servers at a time: start a third (a named server, or as
  another user) and the spawn page says why it was refused.
  The Outpost's log: $DATA/outpost.log

  The Outpost itself, with grpcurl over mTLS as the demo hub (in a second terminal, in
  $(pwd)):

  # what the Outpost serves (server reflection) and whether it is healthy
  $G $A list
  $G $A describe $S
  $G $A grpc.health.v1.Health/Check

  # the servers the hub started (the hub's identity here is "default")
  $G $A $S/ListServers

  # the flavors the hub may offer alice: limits, what is in use, whether she can start one
  $G -d '{"user": {"name": "alice"}}' $A $S/ListFlavors

  # start a Jupyter server by hand (server "by-hand" for user alice, flavor small) (returns once accepted), follow its events
  $G -d '{"server_name": "by-hand", "start_id": "demo-1", "user": {"name": "alice"}, "flavor": "small", "env": {"JUPYTERHUB_API_TOKEN": "demo-token", "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}}' $A $S/Start
  $G -d '{"server_name": "by-hand"}' $A $S/Events

  # its status (with the address, its flavor and when its runtime ends), and the notebook itself
  $G -d '{"server_name": "by-hand"}' $A $S/Poll
  curl -s -H "Authorization: token demo-token" http://127.0.0.1:\$($G -d '{"server_name": "by-hand"}' $A $S/Poll | sed -n 's/.*"port": \([0-9]*\).*/\1/p')/user/alice/api/status

  # stop it (idempotent: run it twice)
  $G -d '{"server_name": "by-hand", "start_id": "demo-1"}' $A $S/Stop

TXT
cd "$DATA"
jupyterhub -f "$OLDPWD/demo/jupyterhub_config.py"
