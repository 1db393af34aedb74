"""What the benchmarks share beyond the test harness: the Outpost process they measure
(:class:`BenchOutpost`, production-like or the old method; :func:`hub_env`, the env a real
JupyterHub sends; CPU pinning), the two hubs the spawn and burst benchmarks compare
(:class:`HubPair`: SimpleLocalProcessSpawner in the hub against OutpostSpawner through an
Outpost and its SSH tunnel), and the JSON they write (``machine_info()``,
``source_info()``, ``write_json()``).

The benchmarks run as scripts (``.venv/bin/python benchmarks/X.py`` from the repository
root). Each puts the repository root first on ``sys.path`` and imports by package name:
``benchmarks.common``, ``benchmarks.bench_spawners`` and ``tests.harness.*`` (the harness
the tests use: the Outpost process, a site, a hub, a private sshd, /proc helpers). One
name per module: the Outpost process imports ``benchmarks.bench_spawners`` by that name
too, and a module imported under two names would be two modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.fernet import Fernet

from tests.harness.outpost import BIN, ROOT, OutpostProcess, outpost_process_factory

INSTANT = "outpost_server.testing.InstantSpawner"

# How bench.py measures (--method): "production" as a site runs the Outpost -- mTLS with a
# client certificate naming the hub, INFO logging, a Start carrying what JupyterHub sends
# (hub_env(), user options) -- or "legacy", the method before issue 15: plaintext without
# credentials (allow_unauthenticated), warnings only, a Start with a user name alone.
METHODS = ("production", "legacy")
BENCH_HUB = "bench-hub"  # the hub's name in its client certificate (production)
# what a spawn form sends (the Outpost allows these keys in production mode)
USER_OPTIONS = {"profile": "cpu-small", "image": "quay.io/jupyter/scipy-notebook:2024-12-09"}


class BenchOutpost(OutpostProcess):
    """The ``jupyterhub-outpost`` process under measurement: the harness's OutpostProcess in
    a temp dir of its own, with SQLite there (``db_path``), a fresh database encryption key,
    ``spawner_class`` and the outpost_config.py text ``config``.

    ``method`` "production": mTLS (a CA, the Outpost's certificate for 127.0.0.1 and a
    client certificate for hub ``BENCH_HUB``, made by ``jupyterhub-outpost
    generate-certs``' own code; ``allowed_hubs`` names that hub), INFO logging, and
    ``USER_OPTIONS``' keys allowed. "legacy": plaintext without credentials and warnings
    only. ``cpus``: the CPUs the process runs on (None: any; see :func:`launched_on`).
    ``client(timeout)`` is an OutpostClient as the hub connects in that mode;
    ``connect_args()`` what a client process needs to make one (``connect()``).
    ``launch()``, ``terminate()`` (SIGTERM, SIGKILL after 15 s), ``cleanup()`` (the dir)."""

    def __init__(
        self, spawner_class: str = INSTANT, config: str = "", *, method: str = "production",
        cpus: set[int] | None = None,
    ):  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"method {method!r}: one of {METHODS}")
        workdir = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
        self.method = method
        self.cpus = cpus
        self.tls = None
        if method == "production":
            from outpost_client.client import TLSConfig
            from outpost_server.certs import generate_certs

            certs = generate_certs(str(workdir / "certs"), hosts=["127.0.0.1"], hubs=[BENCH_HUB])
            hub = certs.hubs[BENCH_HUB]
            self.tls = TLSConfig(ca=certs.ca.cert, cert=hub.cert, key=hub.key)
            config = (
                f"c.Outpost.tls_cert = {certs.server.cert!r}\n"
                f"c.Outpost.tls_key = {certs.server.key!r}\n"
                f"c.Outpost.tls_client_ca = {certs.ca.cert!r}\n"
                f"c.Outpost.allowed_hubs = [{BENCH_HUB!r}]\n"
                f"c.Outpost.allow_user_options = {sorted(USER_OPTIONS)!r}\n"
            ) + config
        super().__init__(workdir, config, env={"OUTPOST_CRYPT_KEY": Fernet.generate_key().decode()})
        self.spawner_class = spawner_class
        self.db_path = workdir / "bench.sqlite"

    def launch(self) -> None:
        # OutpostProcess.start always adds --allow-unauthenticated (the harness's opt-in for
        # plaintext); with TLS on it changes nothing: every connection is authenticated by
        # its client certificate (the log's "serving ... (mTLS ...)" line says so)
        with launched_on(self.cpus):
            self.start(
                "--ip", "127.0.0.1",
                "--db-url", f"sqlite:///{self.db_path}",
                "--spawner-class", self.spawner_class,
                # traitlets' Application.log_level knows "WARN", not "WARNING"
                "--log-level", "INFO" if self.method == "production" else "WARN",
                # one hub with up to 2,000 servers (n=2000, the CPU run): beyond the default cap
                "--Outpost.max_servers_per_hub=0",
            )  # fmt: skip

    def connect_args(self) -> tuple:
        """(address, tls) for :func:`connect` in another process (TLSConfig pickles)."""
        return (self.address, self.tls)

    def client(self, timeout: float):
        return connect(self.connect_args(), timeout)

    def health_channel(self):
        """Over TLS with the hub's certificate in production mode (the port wants one)."""
        if self.tls is None:
            return super().health_channel()
        import grpc

        return grpc.aio.secure_channel(self.address, self.tls.credentials())

    def terminate(self) -> None:
        if self.stop(timeout=15):
            print("the Outpost ignored SIGTERM for 15 s; killed it", file=sys.stderr)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def connect(args: tuple, timeout: float):
    """An OutpostClient from BenchOutpost.connect_args() (also in a client process)."""
    from outpost_client.client import OutpostClient

    address, tls = args
    return OutpostClient(address, tls=tls, timeout=timeout)


def hub_env(user: str, *, hub_connect_url: str | None = "http://127.0.0.1:8082") -> dict[str, str]:
    """The env JupyterHub 6 sends for user's default server through OutpostSpawner:
    jupyterhub's own ``Spawner.get_env()`` (with OutpostSpawner's ``env_keep = []``) for a
    user with a fresh API token, OAuth client and server URL, the hub API reached through
    the reverse forward at ``hub_connect_url`` -- 18 keys, ~1 KB."""
    from jupyterhub.objects import Server
    from jupyterhub.spawner import Spawner

    from outpost_server.hosting import StandInHub, StandInUser

    spawner = Spawner(
        user=StandInUser(name=user, id=1000, url=f"/user/{user}/"),
        hub=StandInHub(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/"),
        orm_spawner=None,
        env_keep=[],
        api_token=secrets.token_hex(16),
        oauth_client_id=f"jupyterhub-user-{user}",
        hub_connect_url=hub_connect_url,
    )
    spawner._server = Server(base_url=f"/user/{user}/")
    spawner.port = 0  # what the hub has before the Outpost reports the address
    return spawner.get_env()


# --- CPU pinning (--pin) ----------------------------------------------------------------------


def parse_pin(text: str) -> tuple[set[int], set[int]]:
    """"0:1" -> ({0}, {1}): the Outpost's CPUs and the clients' (comma lists: "0,1:2,3")."""
    try:
        outpost, client = text.split(":")
        sets = tuple({int(c) for c in part.split(",")} for part in (outpost, client))
    except ValueError:
        raise ValueError(f"--pin {text!r}: give OUTPOST_CPUS:CLIENT_CPUS, e.g. 0:1") from None
    usable = os.sched_getaffinity(0)
    for cpus in sets:
        if not cpus <= usable:
            raise ValueError(f"--pin {text!r}: CPUs {sorted(cpus - usable)} are not usable here ({sorted(usable)})")
    if sets[0] & sets[1]:
        raise ValueError(f"--pin {text!r}: the Outpost's and the clients' CPUs overlap")
    return sets


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of pid (and the threads and processes it makes later) on cpus."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


@contextlib.contextmanager
def launched_on(cpus: set[int] | None):
    """Processes started in this block (from this thread) run on cpus: a child inherits
    the affinity of the thread that forks it, from its first instruction on (so every
    thread it starts too). None: nothing changes."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)  # pid 0: this thread
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def machine_info(**extra) -> dict:
    """The ``machine`` entry of a benchmark's JSON: CPUs usable by this process, their
    model, Python version and platform, then ``extra`` (e.g. versions of the software
    under test)."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count()
    cpu_model = platform.processor()
    try:  # Linux: the name /proc/cpuinfo gives the first CPU
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "nproc": nproc,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }


def source_info(paths=("outpost_server", "outpost_client")) -> dict:
    """What code was measured: the checkout's commit, and a digest of each file under
    paths that differs from it (benchmarks often run on a tree with uncommitted edits)."""
    def git(*args) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.rstrip("\n")  # not strip(): a porcelain line may start with a space
        except (OSError, subprocess.SubprocessError):
            return ""

    modified = {}
    for line in git("status", "--porcelain", "--", *paths).splitlines():
        name = line[3:].split(" -> ")[-1]
        try:
            modified[name] = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]
        except OSError:
            modified[name] = line[:2].strip() or "?"
    return {"commit": git("rev-parse", "HEAD"), "modified": modified}


def write_json(path: str | Path, document: dict, *, sort_keys: bool = True) -> Path:
    """Write document as indented JSON (and a final newline) to path, creating its parent
    directories; print where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=sort_keys) + "\n")
    print(f"wrote {path}")
    return path


# --- two hubs: SimpleLocalProcessSpawner in the hub, and through an Outpost ------------------

# the hub that spawns itself: JupyterHub's SimpleLocalProcessSpawner, the command the site runs
DIRECT_CONFIG = """
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = ["{bin}/jupyterhub-singleuser"]
c.Spawner.args = ["--allow-root"]
c.SimpleLocalProcessSpawner.home_dir_template = "{home}/{{username}}"
"""


def versions() -> dict:
    """The software under test of the hub benchmarks, for the JSON's ``machine`` entry."""
    import jupyterhub

    try:
        import jupyter_server

        js = jupyter_server.__version__
    except Exception:  # pragma: no cover
        js = "?"
    return {"jupyterhub": jupyterhub.__version__, "jupyter_server": js}


def our_processes(root: Path) -> list[tuple[int, str]]:
    """Processes whose working directory is under root (the notebooks of this run:
    SimpleLocalProcessSpawner starts them in their home dir below our work dir)."""
    found = []
    root_s = str(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            if cwd == root_s or cwd.startswith(root_s + "/"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((int(entry.name), cmd))
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return found


async def warm_notebook_imports() -> None:
    """Import the notebook's modules once, so that neither configuration's first spawn pays
    for a cold page cache / bytecode compile that the other then profits from."""
    modules = "import jupyterhub.singleuser, jupyter_server.serverapp"
    try:
        import jupyterlab  # noqa: F401

        modules += ", jupyterlab"
    except ImportError:
        pass
    await asyncio.to_thread(
        subprocess.run, [str(BIN / "python"), "-c", modules], check=True, capture_output=True, timeout=60
    )


class HubPair:
    """The two hubs the hub benchmarks compare, both real JupyterHub processes with the
    real proxy on 127.0.0.1, each with ``hub_extra`` appended to its config:

    - ``direct``: SimpleLocalProcessSpawner in the hub (``DIRECT_CONFIG``) running
      ``jupyterhub-singleuser --allow-root``;
    - ``outpost``: OutpostSpawner against ``site`` (``tests.harness.site.Site``, as the
      end-to-end tests use it: a ``jupyterhub-outpost`` process running the same command
      with SimpleLocalProcessSpawner, its embedded SSH forwarder and the hub API's reverse
      forward), with ``site_extra`` appended to the site's outpost_config.py.

    ``start()`` starts the Outpost and both hubs; ``stop(running)`` stops the servers of
    the users in ``running`` (hub label -> user names), both hubs and proxies, the
    Outpost's servers and the Outpost, then kills any notebook left below ``root`` and
    returns what went wrong (lines starting "left behind" for those)."""

    def __init__(self, root: Path, *, hub_extra: str = "", site_extra: str = ""):
        from tests.harness.hub import JupyterHubProcess
        from tests.harness.site import Site

        self.root = root
        self.factory, self.outposts = outpost_process_factory(root)  # what Site expects
        self.site = Site(self.factory, root, "site", extra=site_extra)
        direct_dir = root / "hub-direct"
        direct_dir.mkdir()
        home = root / "direct-home"
        self.direct = JupyterHubProcess(direct_dir, DIRECT_CONFIG.format(bin=BIN, home=home) + hub_extra)
        outpost_dir = root / "hub-outpost"
        outpost_dir.mkdir()
        self.outpost = JupyterHubProcess(outpost_dir, self.site.hub_config() + hub_extra)
        self.hubs = {"direct": self.direct, "outpost": self.outpost}

    async def start(self) -> float:
        """Start the Outpost (serving, its SSH host key known) and both hubs; seconds taken."""
        t0 = time.perf_counter()
        await self.site.start()
        self.direct.start()
        self.outpost.start()
        await asyncio.gather(self.direct.wait_ready(), self.outpost.wait_ready())
        return time.perf_counter() - t0

    def proxy_pid(self, label: str) -> int | None:
        try:
            return int((self.hubs[label].workdir / "proxy.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def stop(self, running: dict[str, list[str]]) -> list[str]:
        problems = []
        for label, hub in self.hubs.items():
            if hub.proc is not None and hub.proc.poll() is None:
                for user in list(running.get(label, ())):
                    try:
                        await hub.stop_server(user)
                        running[label].remove(user)
                    except Exception as e:
                        problems.append(f"{label}: stopping {user}: {e}")
            hub.stop()
            hub.stop_proxy()
        await self.site.stop_all()  # OutpostClient list_servers + stop of each
        for op in self.outposts:
            op.stop()
        # the notebooks are children of the direct hub / the Outpost; give them a moment
        deadline = time.monotonic() + 10
        while our_processes(self.root) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for pid, cmd in our_processes(self.root):
            problems.append(f"left behind, killed: {pid} {cmd}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return problems
