"""One run per output directory: an exclusive ``flock`` on a lock file qvl-train owns there.

The lock is the kernel's (released when the process ends, however it ends), so a crashed run never leaves
a stale lock behind; the file only tells a second run who holds it. The file stays (removing it would let
a third run lock a new file while the second still holds the old one).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from qvl_data.errors import QvlError

LOCK_FILE = ".qvl-train.lock"


class OutputLock:
    """Holds ``<directory>/.qvl-train.lock`` until :meth:`release` (or the end of the process)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock, or QvlError naming the run that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QvlError(
                f"{self.path}: cannot create the output directory's lock file ({e.strerror}); "
                "--output-dir must be a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise QvlError(
                f"{self.path.parent}: another qvl-train run ({holder}) is writing to this output directory; "
                "wait for it to end, or pass another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
