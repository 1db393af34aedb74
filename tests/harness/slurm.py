"""A private single-node Slurm cluster per test, for the BatchSpawner tests.

Debian 12's ``slurm-wlm`` 22.05 and ``munge`` (``scripts/ensure-system-packages.sh``):
``munged``, ``slurmctld`` and ``slurmd`` started by :class:`SlurmCluster` in the
foreground, with every file (munge key and socket, ``slurm.conf``, state, spool, logs, pid
files) in one directory and their own ports, so nothing touches the machine's
``/etc/slurm`` or ``/run/munge`` and parallel runs do not meet. Jobs run as root without
cgroups (``proctrack/linuxproc``, ``task/none``). Use the ``slurm`` fixture
(``tests/conftest.py``)::

    def test_x(slurm):                 # running, one node with slurm.cpus CPUs
        env = slurm.env                # os.environ + SLURM_CONF: for sbatch/squeue/scancel
        blocker = slurm.occupy()       # a job holding every CPU: the next job stays PENDING
        slurm.squeue()                 # [Job(id, state, reason, node), ...]
        slurm.free()                   # cancel the occupier; the pending job can start
        slurm.stop_controller()        # slurmctld down (jobs keep running; squeue fails)
        slurm.start_controller()       # back, with its saved state

slurmd starts each job in a ``slurmstepd`` that is orphaned on purpose, and this
machine's PID 1 does not reap: the fixture uses ``subreaper`` and reaps them. Teardown
cancels every job, stops the daemons by PID and fails the test if a ``slurmstepd`` or a
daemon survived.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .outpost import ROOT
from .procs import children_of, process_alive, process_name, stop_process
from .util import free_port

__all__ = [
    "ACCOUNT",
    "JOB_NAME",
    "SITE_USER_MAPPING",
    "SLURM_SPAWNER_REQUESTS",
    "Job",
    "SlurmCluster",
    "our_jobs",
    "private_cluster",
    "queue_reason_recipe",
    "slurm_available",
]

# the job name of the SlurmSpawner's jobs in the tests' batch scripts
JOB_NAME = "spawner-jupyterhub"

# Jobs run as root, and so the tests' hub user is "root"; root is never a notebook's local
# account (c.Outpost.user_mapping, outpost_server/accounts.py): the sites map it to this
# account, which the cluster fixture creates (SlurmSpawner looks it up in passwd)
ACCOUNT = "outpost-slurm"
SITE_USER_MAPPING = f'c.Outpost.user_mapping = {{"default": {{"root": "{ACCOUNT}"}}}}\n'

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")

#: outpost_config.py lines of a SlurmSpawner on the private cluster: what its jobs ask for,
#: submitted by the Outpost's own user (no sudo), SLURM_CONF passed on to sbatch (which runs
#: with get_env(), not os.environ). No braces: safe inside a str.format template.
SLURM_SPAWNER_REQUESTS = """\
c.SlurmSpawner.exec_prefix = ""
c.SlurmSpawner.req_partition = "debug"
c.SlurmSpawner.req_nprocs = "1"
c.SlurmSpawner.req_memory = "200M"
c.SlurmSpawner.req_runtime = "00:10:00"
c.SlurmSpawner.startup_poll_interval = 0.5
c.SlurmSpawner.start_timeout = 120
c.SlurmSpawner.env_keep.append("SLURM_CONF")
"""


def slurm_available() -> str:
    """'' if this machine can run a private cluster, else why not."""
    if os.geteuid() != 0:
        return "a private Slurm cluster that runs jobs needs root"
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    missing += [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}); scripts/ensure-system-packages.sh"
    return ""


@dataclass(frozen=True)
class Job:
    """One line of squeue."""

    id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    reason: str  # squeue's %r: Resources, Priority, None, ...
    node: str  # the batch host (%B), empty while pending
    name: str


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, all state under ``root``."""

    def __init__(self, root: Path | None = None, cpus: int = 2):
        # not under pytest's tmp_path: slurmd and slurmstepd open files there, and the
        # job's user must be able to enter it (0755, like tests/harness/sshd.py)
        self.root = Path(root or tempfile.mkdtemp(prefix="outpost-slurm-"))
        os.chmod(self.root, 0o755)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munged: subprocess.Popen | None = None
        self.slurmctld: subprocess.Popen | None = None
        self.slurmd: subprocess.Popen | None = None
        self.blockers: list[str] = []
        self.stepd_pids: set[int] = set()

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        for d in ("state", "slurmd", "munge", "jobs"):
            (self.root / d).mkdir(exist_ok=True)
        self._start_munged()
        self.conf.write_text(self._slurm_conf())
        self._start_slurmctld(clean=True)
        self.slurmd = self._daemon("slurmd", ["/usr/sbin/slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self.wait(lambda: self._sinfo_state() == "idle", timeout, "the node did not become idle")

    def _start_munged(self) -> None:
        d = self.root / "munge"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        # as root (--force): pytest's directories are 0700 root, out of the munge user's reach
        self.munged = self._daemon(
            "munged",
            [
                "/usr/sbin/munged", "-F", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--log-file={d / 'munged.log'}", f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
        )  # fmt: skip
        self.wait(self.munge_socket.exists, 10, "munged did not create its socket")

    def _start_slurmctld(self, clean: bool) -> None:
        args = ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)]
        if clean:
            args.insert(2, "-c")  # a fresh cluster; a restart keeps the saved jobs
        self.slurmctld = self._daemon("slurmctld", args)

    def _daemon(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "a")
        try:
            return subprocess.Popen(
                args, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()

    def _slurm_conf(self) -> str:
        r = self.root
        return f"""\
ClusterName=outposttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'slurmd'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ReturnToService=2
KillWait=2
InactiveLimit=0
MinJobAge=300
# the main scheduler every second (default 60): a pending job shows its reason at once
SchedulerParameters=sched_interval=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=500 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def close(self) -> None:
        """Cancel every job, stop the daemons by PID, reap; raise if something survived."""
        try:
            if self.slurmctld is not None and self.slurmctld.poll() is not None:
                self.start_controller()  # stopped by the test: needed to cancel the jobs
            if self.slurmctld is not None:
                self.run("scancel", "--full", "--partition=debug", check=False)
                try:
                    self.wait(lambda: not self.active(), 20, "jobs still in the queue")
                except AssertionError:
                    pass
        finally:
            for proc in (self.slurmd, self.slurmctld, self.munged):
                stop_process(proc, 15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_alive(p) for p in self._stepds()):
            time.sleep(0.1)
        left = [p for p in self._stepds() if process_alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for pid in self._stepds():  # orphans reparented to this process (subreaper): reap
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        assert not left, f"slurmstepd processes left behind: {left}"

    # --- the controller ---------------------------------------------------------------

    def stop_controller(self) -> None:
        """slurmctld down (SIGTERM, by PID): running jobs go on, squeue/scancel fail."""
        stop_process(self.slurmctld, 15)

    def start_controller(self, timeout: float = 30) -> None:
        """slurmctld up again with its saved state; returns once it answers squeue."""
        assert self.slurmctld is None or self.slurmctld.poll() is not None, "slurmctld is running"
        self._start_slurmctld(clean=False)
        self.wait(lambda: self.run("squeue", "-h", check=False).returncode == 0, timeout,
                  "slurmctld did not answer after its restart")  # fmt: skip

    # --- jobs ---------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(args, env=self.env, input=input, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def squeue(self) -> list[Job]:
        """Every job the controller shows (all states), oldest first."""
        out = self.run("squeue", "-h", "--states=all", "-o", "%i|%T|%r|%B|%j").stdout
        jobs = []
        for line in out.splitlines():
            id_, state, reason, node, name = line.split("|", 4)
            jobs.append(Job(id_, state, reason, "" if node == "n/a" else node, name))
        return jobs

    def job(self, job_id: str) -> Job | None:
        return next((j for j in self.squeue() if j.id == job_id), None)

    def active(self) -> list[Job]:
        """Jobs that are pending, running or completing (not finished ones)."""
        return [j for j in self.squeue() if j.state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")]

    def sbatch(self, script: str, *options: str) -> str:
        out = self.run("sbatch", "--parsable", f"--output={self.root / 'jobs' / '%j.out'}",
                       *options, input=script).stdout  # fmt: skip
        return out.strip().splitlines()[-1].split(";")[0]

    def scancel(self, job_id: str) -> None:
        self.run("scancel", job_id)

    def occupy(self, timeout: float = 20) -> str:
        """Submit a job that holds every CPU of the node and wait until it runs: the next job
        stays PENDING (reason Resources). Returns its id; ``free()`` cancels it."""
        job_id = self.sbatch("#!/bin/sh\nexec sleep 3600\n", "--job-name=occupier",
                             f"--cpus-per-task={self.cpus}")  # fmt: skip
        self.blockers.append(job_id)
        self.wait(lambda: (self.job(job_id) or Job("", "", "", "", "")).state == "RUNNING", timeout,
                  f"the occupier {job_id} did not start")  # fmt: skip
        return job_id

    def free(self, timeout: float = 20) -> None:
        """Cancel the occupiers; returns once they are gone from the running jobs."""
        for job_id in self.blockers:
            self.scancel(job_id)
        blockers, self.blockers = set(self.blockers), []
        self.wait(lambda: not any(j.id in blockers for j in self.active()), timeout,
                  "the occupier did not end")  # fmt: skip

    # --- helpers --------------------------------------------------------------------

    def _sinfo_state(self) -> str:
        r = self.run("sinfo", "-h", "-o", "%t", check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster (orphans: children of this process)."""
        found = [pid for pid in children_of(os.getpid()) if process_name(pid) == "slurmstepd"]
        self.stepd_pids.update(found)
        return found

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text()[-chars:]}")
        return "\n".join(parts)

    def wait(self, predicate, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, proc in (("munged", self.munged), ("slurmctld", self.slurmctld), ("slurmd", self.slurmd)):
                if proc is not None and proc.poll() is not None and name != "slurmctld":
                    raise AssertionError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} within {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)


@contextmanager
def private_cluster(subreaper, cpus: int = 2):
    """A started :class:`SlurmCluster`, closed and removed afterwards (the ``slurm``
    fixture). Skips the test where Slurm cannot run (not root, not installed)."""
    why = slurm_available()
    if why:
        pytest.skip(why)
    from .sshd import ensure_user

    ensure_user(ACCOUNT)
    cluster = SlurmCluster(cpus=cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            subreaper.pids.update(cluster.stepd_pids)  # any not reaped yet
            shutil.rmtree(cluster.root, ignore_errors=True)


def our_jobs(cluster: SlurmCluster) -> list[Job]:
    """The tests' SlurmSpawner jobs (``JOB_NAME``) still in the queue (pending, running or
    completing)."""
    return [j for j in cluster.active() if j.name == JOB_NAME]


def queue_reason_recipe() -> str:
    """The outpost_config.py lines of docs/sites/slurm.md's queue-reason recipe, as written."""
    doc = (ROOT / "docs" / "sites" / "slurm.md").read_text()
    section = doc.split("## What the user sees while the job waits", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]
