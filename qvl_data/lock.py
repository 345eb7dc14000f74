"""One writer per output folder: an advisory ``flock`` on a lock file inside the folder qvl owns (a build's
``--out``, a training run's ``--output-dir``, a score's ``--output-dir``) or beside it (an export's
``--output-dir``, which is replaced whole).

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
    """Whether ``holder`` ("pid N on HOST since TIME", as written below) is a process of this host that is
    gone."""
    match = re.fullmatch(r"pid (\d+) on (\S+)(?: since .*)?", holder)
    if not match or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its holder may have removed it meanwhile)."""
    try:
        st, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def exclusive_lock(
    path: Path,
    folder: Path,
    command: str = "qvl-data build",
    advice: str = "wait for it to finish (or stop it), then re-run",
    remove: bool = False,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block; when another process
    holds it, a one-line QvlError naming ``folder``, the other ``command``'s holder (pid, host, since) and
    ``advice``. The file stays unless ``remove`` (for a folder whose contents are exactly the command's
    outputs): then its holder removes it before releasing it, and a run that locked the removed file
    (opened just before) sees that the path no longer names it and locks the path's new file instead, so
    two runs never both hold "the" lock."""
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an OSError is the caller's one-line error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            # A holder that died (kill -9) still holds the lock through its pool workers until they exit,
            # which takes a moment: wait for them rather than refuse a re-run started right after.
            if _died_here(holder) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise QvlError(
                f"{folder}: another {command} is writing here ({holder or 'a process that just started'}); "
                f"{advice}"
            ) from None
        if _still_at(fd, path):
            break
        os.close(fd)  # removed by its holder after we opened it: lock the one there now
    try:
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)  # while still held (see above)
        os.close(fd)  # releases the lock
