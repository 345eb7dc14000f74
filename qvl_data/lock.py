"""One writer per output folder: an advisory ``flock`` on a lock file inside the folder qvl owns.

Two builds into the same ``--out`` would delete and rewrite each other's shards and could commit a
manifest that describes neither. The lock is released by the kernel when its holder exits, however it
exits (``kill -9`` included), so a stale lock file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qvl_data.errors import QvlError


@contextmanager
def exclusive_lock(path: Path, folder: Path, command: str = "qvl-data build") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block; when another process
    holds it, a one-line QvlError naming ``folder`` and the holder (pid, host)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that just started"
        os.close(fd)
        raise QvlError(
            f"{folder}: another {command} is writing here ({holder}); wait for it to finish (or stop it), "
            "then re-run"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
