"""The notebook's last words (outpost_server/output_tail.py): the end of its output with
the FAILED event of a failed start and with Poll's STOPPED status of an exited server.

The notebooks are real local processes started by JupyterHub's own
SimpleLocalProcessSpawner (the Outpost captures their output), or by
``CheckedLocalProcessSpawner`` (outpost_server.testing), the same Spawner whose start()
fails when its process exits early; a Spawner of this module has the
``outpost_output_tail`` hook. The batchspawner source is in tests/test_slurm.py, on a
real Slurm cluster. The pure parts (bounds, redaction, the batch script's output file,
the safe read of a user's file) are tested here without sockets.
"""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from outpost_client import pb
from outpost_client.spawner import OutpostStartFailed
from outpost_server.output_tail import bound_tail, output_path_in_script, read_file_tail
from outpost_server.testing import FailingSpawner

from .harness.hub import make_spawner
from .harness.util import collect, wait_for

pytestmark = pytest.mark.rpc

TOKEN = "tok-" + uuid.uuid4().hex  # the notebook's API token: never in a tail


def local_traits(tmp_path, script: str, **traits) -> dict:
    """Outpost traits for a notebook that is ``sh -c script`` (JupyterHub's own args
    follow as $0, $1, ...: ignored), with its home under tmp_path."""
    return {
        "SimpleLocalProcessSpawner.cmd": ["/bin/sh", "-c", script],
        "SimpleLocalProcessSpawner.home_dir_template": str(tmp_path / "home" / "{username}"),
        "poll_interval": 0.2,
        **traits,
    }


def env() -> dict[str, str]:
    return {"JUPYTERHUB_API_TOKEN": TOKEN, "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api"}


def capture_files(tmp_path) -> list:
    directory = tmp_path / "output-tail"
    return sorted(directory.iterdir()) if directory.is_dir() else []


async def test_output_tail_of_a_failed_start(start_outpost, tmp_path):
    """A notebook command that prints and exits with an error: its start fails, and the
    FAILED event (and Poll) carry what it printed, with the API token redacted."""
    script = 'echo "known line 1"; echo "token is $JUPYTERHUB_API_TOKEN" >&2; echo "known line 3"; exit 3'
    traits = local_traits(tmp_path, script)
    async with start_outpost("outpost_server.testing.CheckedLocalProcessSpawner", **traits) as op:
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice", env=env())
        events = await collect(op.client, "nb")
        failed = events[-1]
        assert failed.kind == pb.EVENT_KIND_FAILED
        assert failed.message == "The notebook exited with status 3 while it started."
        assert failed.output_tail == "known line 1\ntoken is [secret]\nknown line 3"
        status = await op.client.poll("nb")
        assert status.state == pb.SERVER_STATE_STOPPED and status.output_tail == failed.output_tail
        # the capture: private to the Outpost's user, gone when the hub stops the server
        directory = tmp_path / "output-tail"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        files = capture_files(tmp_path)
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        await op.client.stop("nb")
        assert capture_files(tmp_path) == []


async def test_output_tail_of_a_notebook_that_exits_after_ready(start_outpost, tmp_path):
    """READY, then the notebook dies: Poll's STOPPED status has its last words and exit
    code; BatchPoll and ListServers leave the tail out (they stay small)."""
    script = 'echo "serving"; sleep 0.5; echo "Traceback: MemoryError in the kernel"; exit 4'
    async with start_outpost("simple", **local_traits(tmp_path, script)) as op:
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice", env=env())
        assert (await collect(op.client, "nb"))[-1].kind == pb.EVENT_KIND_READY
        status = await wait_for(
            lambda: _stopped(op.client.poll("nb")), timeout=15, message="the notebook never exited"
        )
        assert status.exit_code == 4
        assert status.output_tail == "serving\nTraceback: MemoryError in the kernel"
        statuses, _ = await op.client.batch_poll(["nb"])
        assert statuses[0].state == pb.SERVER_STATE_STOPPED and statuses[0].output_tail == ""
        listed = await op.client.list_servers()
        assert listed[0].output_tail == ""
        await op.client.stop("nb")


async def _stopped(call):
    status = await call
    return status if status.state == pb.SERVER_STATE_STOPPED else None


async def test_output_tail_bounds_lines_bytes_and_disk(start_outpost, tmp_path):
    """A notebook that floods its output (5 MB) then fails: the tail has at most
    output_tail_lines lines and output_tail_bytes bytes, ends with its last line, and
    the capture on disk never held more than output_tail_bytes."""
    script = (
        "yes \"line $(printf '%0100d' 0)\" | head -n 2000; "
        "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo 'the end'; exit 1"
    )
    traits = local_traits(tmp_path, script, output_tail_lines=5, output_tail_bytes=2000)
    traits["CheckedLocalProcessSpawner.settle"] = 10.0
    async with start_outpost("outpost_server.testing.CheckedLocalProcessSpawner", **traits) as op:
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice", env=env())
        failed = (await collect(op.client, "nb"))[-1]
        assert failed.kind == pb.EVENT_KIND_FAILED
        tail = failed.output_tail
        assert tail.endswith("\nthe end") and len(tail.encode()) <= 2000 and len(tail.splitlines()) <= 5
        assert set(tail.splitlines()[0]) == {"x"}  # the flood's last bytes, cut to the bound
        # the capture keeps at least the last half of the bound (two files of half each;
        # the window's cut first line loses as much as a secret is long)
        assert len(tail.encode()) >= 2000 // 2 - len(TOKEN)
        assert sum(p.stat().st_size for p in capture_files(tmp_path)) <= 2000
        await op.client.stop("nb")


async def test_output_tail_off_captures_nothing(start_outpost, tmp_path):
    traits = local_traits(tmp_path, 'echo "known line"; exit 3', output_tail_lines=0)
    async with start_outpost("outpost_server.testing.CheckedLocalProcessSpawner", **traits) as op:
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice", env=env())
        failed = (await collect(op.client, "nb"))[-1]
        assert failed.kind == pb.EVENT_KIND_FAILED and failed.output_tail == ""
        assert capture_files(tmp_path) == []
        await op.client.stop("nb")


class TailHookSpawner(FailingSpawner):
    """A Spawner that knows its notebook's log: the outpost_output_tail hook."""

    async def outpost_output_tail(self, max_lines, max_bytes):
        lines = [f"log line {i}" for i in range(100)]
        lines.append(f"the token: {self.api_token}")
        return "\n".join(lines)


async def test_output_tail_from_the_spawner_hook(start_outpost):
    async with start_outpost(TailHookSpawner, output_tail_lines=3) as op:
        await op.client.start("nb", uuid.uuid4().hex, user_name="alice", env=env())
        failed = (await collect(op.client, "nb"))[-1]
        assert failed.kind == pb.EVENT_KIND_FAILED
        assert failed.output_tail == "log line 98\nlog line 99\nthe token: [secret]"


async def test_output_tail_reaches_the_hub_user_and_log(start_outpost, tmp_path, caplog):
    """OutpostSpawner: a failed start's tail is in the message the spawn page shows (HTML
    escaped) and in the hub's log; an exited server's tail (BatchPoll says STOPPED, one
    Poll gets it) goes to the hub's log and the next start's spawn page."""
    script = 'echo "<script>alert(1)</script> known line"; exit 3'
    traits = local_traits(tmp_path, script)
    async with start_outpost("outpost_server.testing.CheckedLocalProcessSpawner", **traits) as op:
        spawner = make_spawner(op)
        with pytest.raises(OutpostStartFailed) as err:
            await spawner.start()
        assert err.value.jupyterhub_message.endswith("\n<script>alert(1)</script> known line")
        assert "&lt;script&gt;alert(1)&lt;/script&gt; known line</pre>" in err.value.jupyterhub_html_message
        assert "<script>" not in err.value.jupyterhub_html_message
        assert "    <script>alert(1)</script> known line" in caplog.text

    caplog.clear()
    script = 'echo "serving"; sleep 0.5; echo "segfault in kernel"; exit 4'
    async with start_outpost("simple", **local_traits(tmp_path, script)) as op:
        spawner = make_spawner(op)
        await spawner.start()

        async def exited():
            return await spawner.poll()

        assert await wait_for(exited, timeout=15, message="never exited") == 4
        assert "Last output of" in caplog.text and "    segfault in kernel" in caplog.text
        assert spawner.last_output_tail == "serving\nsegfault in kernel"
        await spawner.stop()
        spawner.clear_state()
        await spawner.start()  # the next start shows it first
        first = [e async for e in spawner.progress()][0]
        assert first["message"].endswith("The last output of your server:\nserving\nsegfault in kernel")
        await spawner.stop()


# --- the pure parts ---------------------------------------------------------------------------


def test_output_tail_bound_and_redact():
    text = "\n".join(f"line {i}" for i in range(10)) + "\n"
    assert bound_tail(text, max_lines=3, max_bytes=1000) == "line 7\nline 8\nline 9"
    assert bound_tail(text, max_lines=100, max_bytes=13) == "line 8\nline 9"[-13:]
    assert bound_tail("a\x1b[31mred\r\nb\x00", max_lines=9, max_bytes=99) == "a\ufffd[31mred\nb\ufffd"
    assert bound_tail(b"caf\xc3\xa9 \xff", max_lines=9, max_bytes=99) == "caf\u00e9 \ufffd"
    secret = "s3cr3t-" + "k" * 20
    assert bound_tail(f"x {secret} y", max_lines=9, max_bytes=99, secrets=(secret,)) == "x [secret] y"
    # a window that starts inside a secret: as much of its first line as a secret is long
    # is dropped, so no part of one is shown; the rest of that line stays
    assert bound_tail(f"{secret[5:]} a\nb", max_lines=9, max_bytes=99, secrets=(secret,), partial_start=True) == "b"
    cut = f"{secret[5:]} and then a long line\nb"
    assert bound_tail(cut, max_lines=9, max_bytes=99, secrets=(secret,), partial_start=True) == "then a long line\nb"
    assert bound_tail(b"\xa9 ok\nb", max_lines=9, max_bytes=99, partial_start=True) == " ok\nb"
    # a cut multi-byte character at the byte bound is dropped whole
    assert bound_tail("é" * 10, max_lines=9, max_bytes=5) == "éé"
    assert bound_tail("anything", max_lines=0, max_bytes=99) == ""


@pytest.mark.parametrize(
    "script, expected",
    [
        ("#SBATCH --output=/home/u/jupyterhub_slurmspawner_%j.log\n", "/home/u/jupyterhub_slurmspawner_42.log"),
        ("#SBATCH -o /scratch/%u/%x-%j.out\n#SBATCH --job-name=nb\n", "/scratch/alice/nb-42.out"),
        ("#SBATCH --chdir=/home/u\n#SBATCH --output=logs/%j.log\n", "/home/u/logs/42.log"),
        ("#SBATCH --output=logs/%j.log\n", None),  # relative to a directory not known here
        ("#SBATCH --output=/x/%A_%a.log\n", None),  # an array job's pattern
        ("#BSUB -o /home/u/lsf.%J.out\n", "/home/u/lsf.42.out"),
        ("#PBS -o /home/u/.jupyterhub.pbs.out\n", "/home/u/.jupyterhub.pbs.out"),
        ("Output = /home/u/.jupyterhub.condor.out\n", "/home/u/.jupyterhub.condor.out"),
        ("#!/bin/sh\nexec notebook\n", None),
    ],
)
def test_output_tail_batch_output_file(script, expected):
    assert output_path_in_script(script, job_id="42", user="alice") == expected


def test_output_tail_reads_only_the_users_own_regular_file(tmp_path):
    me = {os.geteuid()}
    log = tmp_path / "job.log"
    log.write_bytes(b"a" * 100 + b"\nlast")
    assert read_file_tail(str(log), 10, me) == (b"\nlast"[-10:].rjust(10, b"a"), True)
    assert read_file_tail(str(log), 1000, me) == (log.read_bytes(), False)
    (tmp_path / "link.log").symlink_to(log)
    with pytest.raises(OSError):  # ELOOP: a symlink planted where the job writes
        read_file_tail(str(tmp_path / "link.log"), 10, me)
    os.link(log, tmp_path / "hard.log")
    with pytest.raises(PermissionError):  # a hard link to a file of someone else's
        read_file_tail(str(tmp_path / "hard.log"), 10, me)
    os.unlink(tmp_path / "hard.log")
    with pytest.raises(PermissionError):  # not owned by the notebook's account
        read_file_tail(str(log), 10, {os.geteuid() + 12345})
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(PermissionError):  # a FIFO would block the read for ever
        read_file_tail(str(tmp_path / "fifo.log"), 10, me)
