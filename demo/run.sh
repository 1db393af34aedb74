#!/usr/bin/env bash
# make demo: an Outpost on 127.0.0.1:50051 with the simple Spawner and SQLite, and the
# grpcurl commands to drive it (run them from this checkout in a second terminal).
set -euo pipefail
cd "$(dirname "$0")/.."
G=".venv/bin/grpcurl -plaintext"
A="127.0.0.1:50051"
S="jupyterhub.outpost.v1.OutpostService"
cat <<TXT

  Outpost demo: gRPC on $A, simple Spawner, SQLite in demo-data/.
  In a second terminal, in $(pwd):

  # what the Outpost serves (server reflection) and whether it is healthy
  $G $A list
  $G $A describe $S
  $G $A grpc.health.v1.Health/Check

  # start a Jupyter server for alice (returns once accepted), follow its progress events
  $G -d '{"server_name": "alice", "start_id": "demo-1", "user": {"name": "alice"}, "env": {"JUPYTERHUB_API_TOKEN": "demo-token", "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}}' $A $S/Start
  $G -d '{"server_name": "alice"}' $A $S/Events

  # its status (with the address), the list of servers, the notebook itself
  $G -d '{"server_name": "alice"}' $A $S/Poll
  $G $A $S/ListServers
  curl -s -H "Authorization: token demo-token" http://127.0.0.1:\$(.venv/bin/grpcurl -plaintext -d '{"server_name": "alice"}' $A $S/Poll | sed -n 's/.*"port": \([0-9]*\).*/\1/p')/user/alice/api/status

  # stop it (idempotent: run it twice)
  $G -d '{"server_name": "alice", "start_id": "demo-1"}' $A $S/Stop

  Ctrl-C stops the Outpost; running notebooks keep running and are picked up again by the
  next 'make demo'.

TXT
exec .venv/bin/jupyterhub-outpost -f demo/outpost_config.py
