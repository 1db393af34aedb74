"""Generated protobuf and gRPC stubs for jupyterhub.outpost.v1 (see scripts/gen_protos.py)."""
