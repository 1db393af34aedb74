"""The contract: generated stubs match the proto, they do not shadow jupyterhub, buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .harness.outpost import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402

pytestmark = pytest.mark.unit


def test_generated_stubs_do_not_drift(tmp_path):
    written = gen_protos.generate(tmp_path)
    assert {p.name for p in written} == {"outpost_pb2.py", "outpost_pb2.pyi", "outpost_pb2_grpc.py"}
    for fresh in written:
        committed = ROOT / "outpost_client" / "v1" / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(ROOT)} differs from what protos/ generates: run `make proto`"
        )


def test_generated_files_say_do_not_edit():
    for name in ("outpost_pb2.py", "outpost_pb2.pyi", "outpost_pb2_grpc.py"):
        first = (ROOT / "outpost_client" / "v1" / name).read_text().splitlines()[0]
        assert "do not edit" in first and "make proto" in first


def test_stubs_do_not_shadow_jupyterhub():
    code = (
        "import outpost_client.v1.outpost_pb2_grpc, outpost_client\n"
        "import jupyterhub, jupyterhub.spawner\n"
        "assert hasattr(jupyterhub.spawner, 'LocalProcessSpawner')\n"
        "assert 'site-packages' in jupyterhub.__file__ or 'dist-packages' in jupyterhub.__file__, jupyterhub.__file__\n"
        "from outpost_client.v1 import outpost_pb2\n"
        "assert outpost_pb2.DESCRIPTOR.package == 'jupyterhub.outpost.v1'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_buf_lint():
    buf = shutil.which("buf") or str(ROOT / "node_modules" / ".bin" / "buf")
    if not Path(buf).exists():
        pytest.fail("buf is not installed: `make setup` installs it from npm (@bufbuild/buf)")
    out = subprocess.run([buf, "lint"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rpc_comment_states_status_codes_and_idempotency():
    from outpost_client.v1 import outpost_pb2

    proto = (ROOT / "protos" / "jupyterhub" / "outpost" / "v1" / "outpost.proto").read_text()
    service = outpost_pb2.DESCRIPTOR.services_by_name["OutpostService"]
    for method in service.methods:
        head = proto.split(f"  rpc {method.name}(")[0].rsplit("\n\n", 1)[-1]
        assert "Status codes:" in head, method.name
        assert "dempoten" in head or "Read-only" in head, method.name
