#!/usr/bin/env python3
"""Regenerate the committed gRPC/protobuf stubs in outpost_client/v1/.

Usage: python scripts/gen_protos.py [--out DIR]

The proto's own path is jupyterhub/outpost/v1/outpost.proto, which would map to the Python
module `jupyterhub.outpost.v1` and shadow the real `jupyterhub` package. protoc's
`-I<virtual>=<real>` mapping presents the file as outpost_client/v1/outpost.proto instead,
so the stubs import as `outpost_client.v1.outpost_pb2` (the proto package, and so every
service and message name on the wire, stays `jupyterhub.outpost.v1`).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "jupyterhub" / "outpost" / "v1"
VIRTUAL = "outpost_client/v1"
HEADER = "# Generated — do not edit; regenerate with `make proto` (scripts/gen_protos.py).\n"


def generate(out: Path) -> list[Path]:
    """Generate the stubs into out/outpost_client/v1/ and return the files written."""
    import grpc_tools

    wkt = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{VIRTUAL}={PROTO_DIR}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{VIRTUAL}/outpost.proto",
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        dest = out / VIRTUAL
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / VIRTUAL).iterdir()):
            text = HEADER + src.read_text()
            target = dest / src.name
            target.write_text(text)
            written.append(target)
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write into")
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
