"""A real Docker engine for the container test: a private dockerd and a base image built from
Debian packages (no registry is reachable here).

- :func:`docker_unavailable`: why the engine cannot run here (None if it can).
- :func:`base_image_tar`: a Debian bookworm root filesystem with Python 3.11 made by
  debootstrap, as a tarball for ``docker import``; made once per machine and recipe and
  kept under ``IMAGE_CACHE`` (``OUTPOST_TEST_IMAGE_CACHE``; /var/cache/outpost-test-images),
  keyed by a hash of :data:`BASE_RECIPE`, so later runs import it in seconds.
- :class:`PrivateDockerd`: ``dockerd`` on a socket and data root of its own under a temp
  dir, ``--bridge=none`` and no iptables (containers use the host network), the Debian
  client ``/usr/bin/docker`` (it has BuildKit) pointed at it; stopped by its pid, its
  directories removed, and what dockerd writes outside them (/run/docker, /etc/docker's
  key.json) removed if it was not there before.

Recipe and pitfalls: shared/TESTBED.md ("Containers").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .procs import process_alive

IMAGE_CACHE = Path(os.environ.get("OUTPOST_TEST_IMAGE_CACHE", "/var/cache/outpost-test-images"))
DOCKER = "/usr/bin/docker"  # Debian's client: another one earlier on PATH may lack BuildKit
DOCKERD = "/usr/sbin/dockerd"
DEBOOTSTRAP = "/usr/sbin/debootstrap"

#: what the base image is made of; its hash names the cached tarball (change it, and the
#: next run makes a new one). python3.11 is what python:3.11-slim-bookworm has too.
BASE_RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["python3", "python3-venv", "ca-certificates"],
    "exclude_from_tar": [
        "./var/cache/apt/archives/*.deb",
        "./var/lib/apt/lists/*",
        "./usr/share/doc/*",
        "./usr/share/man/*",
        "./usr/share/locale/*",
    ],
    "changes": ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["python3"]'],
}

#: the Debian mirror when the machine's apt sources name none
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def docker_unavailable() -> str | None:
    """Why a private Docker engine cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root (CI runs as root)"
    for tool in (DOCKER, DOCKERD, DEBOOTSTRAP):
        if not os.path.exists(tool):
            return f"{tool} missing (make setup installs docker.io and debootstrap)"
    return None


def recipe_key(recipe: dict = BASE_RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debian_mirror() -> str:
    """The first Debian mirror of this machine's apt sources (the one its own installs use)."""
    for source in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            text = Path(source).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in words[-2]:
                return next(w for w in words[1:] if "://" in w)
    return DEFAULT_MIRROR


def base_image_tar(cache: Path = IMAGE_CACHE, recipe: dict = BASE_RECIPE) -> Path:
    """The base image's root filesystem as a tarball, made with debootstrap the first time
    (about a minute) and reused afterwards. Parallel runs wait for each other (a lock
    file) instead of making it twice."""
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / f"{recipe['suite']}-python-{recipe_key(recipe)}.tar"
    if tar.exists():
        return tar
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.exists():
            return tar
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache))
        try:
            rootfs = work / "rootfs"
            out = subprocess.run(
                [
                    DEBOOTSTRAP, f"--variant={recipe['variant']}", f"--include={','.join(recipe['include'])}",
                    recipe["suite"], str(rootfs), debian_mirror(),
                ],  # fmt: skip
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if out.returncode != 0:
                raise AssertionError(f"debootstrap failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
            partial = work / "rootfs.tar"
            excludes = [f"--exclude={pattern}" for pattern in recipe["exclude_from_tar"]]
            subprocess.run(["tar", "-C", str(rootfs), *excludes, "-cf", str(partial), "."], check=True, timeout=300)
            partial.rename(tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tar


class PrivateDockerd:
    """``dockerd`` of this test alone: ``start()``, ``docker(*args)``, ``stop()``.

    Its socket, data root, exec root, config and the client's config are under one temp
    dir (short: a unix socket path has at most 107 bytes)."""

    #: paths dockerd writes outside its own directories whatever it is told
    OUTSIDE = (Path("/run/docker"), Path("/etc/docker/key.json"))

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="op-docker-"))
        self.sock = self.dir / "docker.sock"
        self.pidfile = self.dir / "dockerd.pid"
        self.log = self.dir / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        self._existed = {path: path.exists() for path in self.OUTSIDE}
        self.env = dict(
            os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(self.dir / "config"), DOCKER_BUILDKIT="1"
        )

    def start(self, timeout: float = 60) -> None:
        (self.dir / "daemon.json").write_text("{}")
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [
                DOCKERD, "--data-root", str(self.dir / "root"), "--exec-root", str(self.dir / "exec"),
                "-H", f"unix://{self.sock}", "--pidfile", str(self.pidfile),
                "--config-file", str(self.dir / "daemon.json"),
                "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
                "--storage-driver", "overlay2",
            ],  # fmt: skip
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        logf.close()
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd not up after {timeout}s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        """Run the docker client against this engine to its end (text output captured)."""
        out = subprocess.run(
            [DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {out.returncode}\n{out.stdout[-4000:]}{out.stderr[-4000:]}")
        return out

    def import_base(self, tar: Path, tag: str, changes=BASE_RECIPE["changes"]) -> None:
        """``docker import`` of a root filesystem tarball as image ``tag``."""
        opts = [arg for change in changes for arg in ("--change", change)]
        self.docker("import", *opts, str(tar), tag, timeout=300)

    def stop(self, timeout: float = 30) -> None:
        """Remove every container, SIGTERM dockerd (by pid; SIGKILL after timeout and its
        containerd with it), then its directories."""
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # the managed containerd is in dockerd's session: nothing of it may outlive the test
        left = [pid for pid in _session_members(self.proc.pid) if process_alive(pid)] if self.proc else []
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in mounts_under(self.dir):  # e.g. exec/netns/default (nsfs), left mounted
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        for path, existed in self._existed.items():
            if not existed:
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()


def mounts_under(directory: Path) -> list[str]:
    """Mount points below directory, deepest first."""
    prefix = f"{directory}/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


def _session_members(sid: int) -> list[int]:
    """Processes whose session id is sid (dockerd's: it was started in a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and int(entry) != sid:
            found.append(int(entry))
    return found
