"""The Outpost: a gRPC service that hosts a JupyterHub Spawner for remote hubs."""

import os

# Spawners fork (LocalProcessSpawner's Popen with preexec_fn, batch tools, ...). With
# gRPC's fork support on, a child forked while gRPC threads are busy can die before it
# execs, and Popen cannot tell (measured: 1 notebook in 3 lost). The Outpost never
# uses gRPC in a forked child, so it turns fork support off before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
