"""The harness the tests and the benchmarks share: the Outpost under test, a site, a hub,
and the small helpers around them. The tests use it through tests/conftest.py's fixtures
and by import (``from .harness.util import wait_for``); the benchmarks by import
(``from tests.harness.outpost import OutpostProcess``, with the repository root on
``sys.path``). Nothing here is a fixture or a test.

- ``util``: ``sid()``, ``collect()`` (a start's Events stream), ``free_port()``,
  ``port_open()``, ``wait_for()``, ``percentile()``.
- ``procs``: processes from /proc -- ``children_of()``, ``descendants_of()``,
  ``process_state()``, ``process_name()``, ``process_alive()``, ``processes_with_argv()``,
  ``rss_kib()``, ``cpu_seconds()``, ``threads_of()``, ``open_fds()`` --,
  ``stop_process()`` (SIGTERM, wait, SIGKILL) and orphan reaping
  (``set_child_subreaper()``, ``Subreaper``).
- ``outpost``: ``ROOT``, ``BIN``, ``OUTPOST_BIN``; the Outpost in this process
  (``running_outpost()``, ``outpost_config()``, ``stored_rows()``) and as the console
  script (``OutpostProcess``, ``outpost_process_factory()``, ``outpost_env()``,
  ``run_outpost()``, ``one_line()``).
- ``site``: ``Site``, an Outpost process as a site runs it (by default SimpleLocalProcessSpawner
  and the SSH forwarder), with what a hub needs to use it.
- ``hub``: ``JupyterHubProcess`` (a real JupyterHub and proxy), ``TOKEN`` (its service
  token), ``hub_client()`` (an OutpostClient as a hub connects), ``make_spawner()`` (an
  OutpostSpawner outside a hub).
- ``sshd``: ``PrivateSSHD``, a private OpenSSH server.
- ``slurm``: ``SlurmCluster``, a private single-node Slurm cluster (``private_cluster()``),
  ``JOB_NAME``, ``our_jobs()``, ``queue_reason_recipe()``.
- ``kube``: KubeSpawner without a cluster -- ``fake_kubernetes()`` (a kubeconfig naming no
  server, ``FakeCoreV1Api``: a fault-injection API client that holds and then refuses the pod
  create, ``LoadedReflector``), ``in_process_hub()`` (a JupyterHub application, initialized,
  not started), ``hub_user()``, ``ReadRecorder``.
- ``netns``: two network namespaces, hub and site (``hub_and_site()``).
- ``docker``: ``PrivateDockerd`` (a private Docker engine), ``base_image_tar()`` (a Debian
  base image made with debootstrap, cached per machine), ``docker_unavailable()``.
- ``browser``: ``Browser``, a headless Chromium driven by selenium as a person uses a hub
  (``login()``, ``open()``, ``wait_text()``, ``shot()``), and ``browser_unavailable()``.
- ``e2e_driver``: drives a hub as a user would, from inside the hub's namespace
  (``python -m tests.harness.e2e_driver``); ``read_progress()``, ``browser_oauth()``.
"""

import os

# before anything imports grpc: as the Outpost itself does (see outpost_server/__init__.py),
# for the Spawners a test hosts in this process
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
