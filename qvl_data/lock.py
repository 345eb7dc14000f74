"""One writer per output folder: an advisory ``flock`` on a lock file inside the folder qvl owns (a build's
``--out``, a training run's ``--output-dir``).

Two builds into the same ``--out`` would delete and rewrite each other's shards and could commit a
manifest that describes neither; two training runs would interleave their checkpoints. The lock is released by the kernel when its holder exits, however it
exits (``kill -9`` included), so a stale lock file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qvl_data.errors import QvlError

EXIT_WAIT_SECONDS = 30.0  # how long a dead holder's workers may take to exit


def _died_here(holder: str) -> bool:
    """Whether ``holder`` ("pid N on HOST", as written below) is a process of this host that is gone."""
    match = re.fullmatch(r"pid (\d+) on (.+)", holder)
    if not match or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextmanager
def exclusive_lock(
    path: Path,
    folder: Path,
    command: str = "qvl-data build",
    advice: str = "wait for it to finish (or stop it), then re-run",
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block; when another process
    holds it, a one-line QvlError naming ``folder``, the other ``command``'s holder (pid, host) and
    ``advice``. The file stays: removing it would let a third run lock a new file while a second holds
    the old one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an OSError is the caller's one-line error
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            # A holder that died (kill -9) still holds the lock through its pool workers until they exit,
            # which takes a moment: wait for them rather than refuse a re-run started right after.
            if _died_here(holder) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            raise QvlError(
                f"{folder}: another {command} is writing here ({holder or 'a process that just started'}); "
                f"{advice}"
            ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
