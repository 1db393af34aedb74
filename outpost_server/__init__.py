"""The Outpost: a gRPC service that hosts a JupyterHub Spawner for remote hubs."""

__version__ = "0.1.0"
