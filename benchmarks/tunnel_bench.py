"""Download throughput through the hub's SSH tunnel, against OpenSSH's ``ssh -L``.

A private OpenSSH ``sshd`` (``tests/harness/sshd.py``) stands for the Outpost's SSH
server; a source process stands for the notebook (it sends N MB to whoever connects); a
downloader process stands for the browser/proxy (a raw ``recv_into`` loop). Both are
separate processes, as in production, where only the tunnel runs in the hub process:

  (a) ``outpost_client.tunnel.Tunnel.forward`` in this process (the hub), and
  (b) ``ssh -N -L`` (OpenSSH client) with the same key, ``-c <cipher>``,
      ``-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null``.

The sshd offers only ``--cipher`` (its ``Ciphers`` line), so both clients use it; the
cipher our connection negotiated is checked. Runs of (a) and (b) alternate, each one
downloads N MB once; the figure is the median of ``--runs`` runs (after one warm-up run
each). CPU seconds per GB of the forwarding process are reported too (this process for
(a), the ``ssh`` process for (b)).

    .venv/bin/python benchmarks/tunnel_bench.py [--mb 300] [--runs 3] [--json PATH]
        [--cipher aes128-gcm@openssh.com] [--set CHANNEL_MAX_PKTSIZE=131072 ...]

``--set NAME=VALUE`` overrides a tuning constant of ``outpost_client.tunnel`` for this
run (how the defaults were chosen). The exit status is non-zero only when the benchmark
itself fails; the target (ratio >= 0.8) is shown as ok/miss.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from benchmarks.common import machine_info, write_json  # noqa: E402
from tests.harness.procs import cpu_seconds  # noqa: E402
from tests.harness.sshd import PrivateSSHD  # noqa: E402
from tests.harness.util import free_port, port_open  # noqa: E402

from outpost_client import tunnel as tunnel_mod  # noqa: E402
from outpost_client.tunnel import SSHTarget, Tunnel  # noqa: E402

TARGET_RATIO = 0.8
CHUNK = 4 << 20  # bytes the source writes per sendall


# --- the two helper processes (spawned: no state shared with the hub process) -------------


def source_main(port: int, mb: int, ready) -> None:
    """The 'notebook': for each connection, read one byte, then send mb MiB and close."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    ready.set()
    payload = memoryview(os.urandom(1 << 16) * (CHUNK >> 16))
    total = mb << 20
    while True:
        conn, _ = srv.accept()
        try:
            if conn.recv(1):  # readiness probes send nothing
                sent = 0
                while sent < total:
                    n = min(CHUNK, total - sent)
                    conn.sendall(payload[:n])
                    sent += n
        except OSError:
            pass
        finally:
            conn.close()


def downloader_main(pipe) -> None:
    """The 'browser': for each port received, download until EOF; reply (bytes, seconds)."""
    buf = bytearray(1 << 20)
    while True:
        port = pipe.recv()
        if port is None:
            return
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"g")
            n = 0
            while True:
                k = c.recv_into(buf)
                if not k:
                    break
                n += k
        pipe.send((n, time.perf_counter() - t0))


# --- helpers ------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def versions() -> dict:
    """The software under test, for the JSON's ``machine`` entry."""
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    import asyncssh
    import cryptography

    return {
        "asyncssh": asyncssh.__version__,
        "cryptography": cryptography.__version__,
        "openssh": ssh_version,
    }


def apply_overrides(pairs: list[str]) -> dict:
    applied = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not hasattr(tunnel_mod, name):
            raise SystemExit(f"--set: outpost_client.tunnel has no {name}")
        old = getattr(tunnel_mod, name)
        if isinstance(old, bool):
            new = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(old, tuple):
            new = tuple(v for v in value.split(",") if v)
        else:
            new = type(old)(value)
        setattr(tunnel_mod, name, new)
        applied[name] = new
    return applied


# --- the benchmark ------------------------------------------------------------------------


async def measure(args) -> dict:
    ctx = mp.get_context("spawn")
    sshd = PrivateSSHD(extra_config=f"Ciphers {args.cipher}\n")
    source_port = free_port()
    key = sshd.add_client_key(
        "hub", options=f'restrict,port-forwarding,permitopen="127.0.0.1:{source_port}"'
    )
    ready = ctx.Event()
    source = ctx.Process(target=source_main, args=(source_port, args.mb, ready), daemon=True)
    here, there = ctx.Pipe()
    downloader = ctx.Process(target=downloader_main, args=(there,), daemon=True)
    ssh: subprocess.Popen | None = None
    tunnel: Tunnel | None = None
    loop = asyncio.get_running_loop()
    try:
        sshd.start()
        source.start()
        downloader.start()
        if not ready.wait(10):
            raise RuntimeError("the source process did not start")

        # (b) OpenSSH
        ssh_port = free_port()
        ssh = subprocess.Popen(
            [
                "ssh", "-N", "-L", f"127.0.0.1:{ssh_port}:127.0.0.1:{source_port}",
                "-p", str(sshd.port), "-i", str(key), "-c", args.cipher,
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", "-F", "/dev/null",
                f"{sshd.user}@127.0.0.1",
            ],
            stdin=subprocess.DEVNULL,
        )
        await loop.run_in_executor(None, wait_port, ssh_port)

        # (a) our tunnel
        target = SSHTarget(
            "127.0.0.1", sshd.port, sshd.user, client_keys=(str(key),), known_hosts=str(sshd.known_hosts)
        )
        tunnel = Tunnel.for_target(target)
        tunnel_port = await tunnel.forward("bench", "127.0.0.1", source_port)
        cipher = tunnel._conn.get_extra_info("recv_cipher")
        if cipher != args.cipher:
            raise RuntimeError(f"the tunnel negotiated {cipher}, not {args.cipher}")

        async def download(port: int, cpu) -> tuple[float, float]:
            cpu0 = cpu()
            here.send(port)
            n, seconds = await loop.run_in_executor(None, here.recv)
            if n != args.mb << 20:
                raise RuntimeError(f"downloaded {n} bytes instead of {args.mb << 20}")
            return n / seconds / 1e6, (cpu() - cpu0) / (n / 1e9)

        def ssh_cpu() -> float:
            return cpu_seconds(ssh.pid)

        runs: dict[str, list[tuple[float, float]]] = {"tunnel": [], "openssh": []}
        await download(tunnel_port, time.process_time)  # warm-up
        await download(ssh_port, ssh_cpu)
        for _ in range(args.runs):
            runs["tunnel"].append(await download(tunnel_port, time.process_time))
            runs["openssh"].append(await download(ssh_port, ssh_cpu))
        fast = getattr(tunnel._conn.data_received, "__self__", None)
        return {"cipher": cipher, "runs": runs, "fast_path_packets": getattr(fast, "packets", 0)}
    finally:
        if tunnel is not None:
            await tunnel.close()
        if ssh is not None:
            ssh.terminate()
            ssh.wait()
        if downloader.is_alive():
            here.send(None)
            downloader.join(5)
            if downloader.is_alive():
                downloader.kill()
                downloader.join()
        if source.is_alive():
            source.kill()
            source.join()
        log_tail = sshd.log.read_text()[-2000:] if sshd.log.exists() else ""
        sshd.close()
        if sys.exc_info()[0] is not None and log_tail:
            print(f"--- sshd log (tail) ---\n{log_tail}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="MiB per download (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each (default 3)")
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com", help="the one cipher sshd offers")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a tuning constant of outpost_client.tunnel")
    args = parser.parse_args(argv)
    overrides = apply_overrides(args.set)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("outpost.tunnel").setLevel(logging.ERROR)  # no "reconnecting" noise at exit

    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        result = asyncio.run(measure(args))
    except Exception as e:
        print(f"benchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    runs = result["runs"]
    fast_packets = result["fast_path_packets"]
    tunnel_mb_s = statistics.median(r[0] for r in runs["tunnel"])
    openssh_mb_s = statistics.median(r[0] for r in runs["openssh"])
    ratio = tunnel_mb_s / openssh_mb_s
    print(f"{args.mb} MiB downloads, cipher {result['cipher']}, {args.runs} runs each (median)")
    print(f"{'':10} {'MB/s':>8}  {'runs (MB/s)':<26} {'CPU s/GB':>9}")
    for name in ("tunnel", "openssh"):
        figures = " ".join(f"{r[0]:7.0f}" for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        print(f"{name:10} {statistics.median(r[0] for r in runs[name]):8.0f}  {figures:<26} {cpu:9.2f}")
    cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    verdict = "ok" if ratio >= TARGET_RATIO else "miss"
    print(f"tunnel/openssh ratio {ratio:.2f} (target >= {TARGET_RATIO}: {verdict}); "
          f"CPU per GB openssh/tunnel {cpu['openssh'] / cpu['tunnel']:.2f}")
    if fast_packets is not None:
        print(f"receive fast path: {'on' if fast_packets else 'OFF'} ({fast_packets} packets)")
    if overrides:
        print(f"overrides: {overrides}")
    load_after = os.getloadavg()[0]
    print(f"total run time {time.monotonic() - t0:.1f}s; load average {load_before:.2f} before, "
          f"{load_after:.2f} after (other work on the machine skews MB/s; CPU s/GB much less)")

    if args.json:
        document = {
            "tunnel_mb_s": round(tunnel_mb_s, 1),
            "openssh_mb_s": round(openssh_mb_s, 1),
            "tunnel_vs_openssh_ratio": round(ratio, 3),
            "cipher": result["cipher"],
            "mb": args.mb,
            "runs": {k: [round(r[0], 1) for r in v] for k, v in runs.items()},
            "cpu_s_per_gb": {k: round(v, 3) for k, v in cpu.items()},
            "fast_path_packets": fast_packets,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "target_ratio": TARGET_RATIO,
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            "machine": machine_info(**versions()),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
