"""The output capture of one local notebook process: stdin to two bounded files.

Run by the Outpost (outpost_server/output_tail.py) as its own small process, as
``python -I -S _capture.py PATH SEGMENT_BYTES``, with the read end of the notebook's
stdout/stderr pipe as stdin. It appends what it reads to PATH, and passes it on to its own stderr (the Outpost's,
where a notebook's output went before, as under JupyterHub); when PATH holds
SEGMENT_BYTES it becomes PATH.1 (the previous PATH.1 is dropped) and a new PATH begins.
So the two files never hold more than 2 * SEGMENT_BYTES, however much the notebook
writes, and PATH.1 + PATH is always the end of its output.

A process of its own, not a reader in the Outpost: the notebook outlives a restart of
the Outpost, and a pipe whose reader went away would make its next write fail (or kill
it with SIGPIPE). It ends when the pipe does (the notebook and whatever inherited its
stdout have exited). Standard library only, nothing of the Outpost's imported: it starts
in milliseconds and holds no more than one read buffer.
"""

import os
import signal
import sys

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(path: str, segment: int) -> None:
    tee = True
    # the notebook's signals are not ours: only the end of the pipe ends this
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    old = path + ".1"
    fd = os.open(path, FLAGS, 0o600)
    size = 0
    read_size = max(4096, min(65536, segment))
    while True:
        try:
            chunk = os.read(0, read_size)
        except InterruptedError:
            continue
        if not chunk:
            break
        if tee:
            try:
                write_all(2, chunk)
            except OSError:
                tee = False  # the Outpost's stderr is gone (a restart): the files still hold it
        if len(chunk) > 2 * segment:
            chunk = chunk[-2 * segment :]  # it alone fills both files
        while chunk:
            if size >= segment:
                os.close(fd)
                os.replace(path, old)
                fd = os.open(path, FLAGS, 0o600)
                size = 0
            part, chunk = chunk[: segment - size], chunk[segment - size :]
            write_all(fd, part)
            size += len(part)
    os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1], max(1, int(sys.argv[2])))
