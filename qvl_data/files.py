"""How qvl touches the file system: what it may read, what it may replace, and how an environment failure
(permissions, a full disk, a file where a folder belongs) becomes one line.

* Every file qvl reads is checked with ``os.stat`` first (:func:`regular_file`): a FIFO would block the
  reader forever, a device never ends.
* A command replaces an existing output only when that output is its own earlier one; it writes through a
  ``.tmp`` sibling and a rename (:func:`write_atomic`), so a failed run leaves the previous file intact.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from qvl_data.errors import QvlError

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def file_kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def regular_file(path: str | Path, what: str) -> os.stat_result:
    """``os.stat(path)``, or a one-line QvlError when ``path`` (``what``: "data file", ...) is missing or is
    not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QvlError(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise QvlError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise QvlError(
            f"{path}: the {what} is {file_kind(st.st_mode)}, not a regular file; point it at a file"
        )
    return st


def is_regular_file(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into ``<path>.tmp``, made durable, then renamed over ``path``: readers see the old
    file or the new one, never half of one, and a failure leaves the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_foreign(path: Path, ours: Callable[[Path], bool], option: str) -> None:
    """Stop, in one line, unless ``path`` is absent or ``ours(path)`` (an earlier output of this command)."""
    if not os.path.lexists(path):
        return
    if not is_regular_file(path):
        raise QvlError(f"{path}: {option} exists and is not a regular file; choose another {option}")
    if not ours(path):
        raise QvlError(
            f"{path}: {option} exists and was not written by this qvl command; qvl never overwrites "
            f"a file it did not write: choose another {option} or remove the file"
        )


_OUT_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose another {option}), then re-run the same command",
    errno.EDQUOT: "the disk quota is exhausted: free space (or choose another {option}), then re-run the same "
    "command",
    errno.EACCES: "not writable: fix the folder's permissions or choose another {option}",
    errno.EPERM: "not writable: fix the folder's permissions or choose another {option}",
    errno.EROFS: "a read-only file system: choose another {option}",
    errno.ENOTDIR: "a file stands where a folder belongs: choose another {option}",
    errno.EEXIST: "a file stands where a folder belongs: choose another {option}",
}
_RESUMES = " (finished partitions are kept)"


def environment_error(e: OSError, out: Path, option: str = "--out", resumable: bool = True) -> QvlError:
    """A one-line error for an OSError met while writing ``out`` (``option``'s value): the path and what to
    do. ``resumable``: the same command resumes where it stopped (a build)."""
    path = e.filename or out
    advice = _OUT_ADVICE.get(e.errno or 0, "")
    if not advice or (e.errno in (errno.EACCES, errno.EPERM) and not _inside(path, out)):
        advice = "fix that and re-run the same command"
    advice = advice.format(option=option)
    if resumable and advice.endswith("re-run the same command"):
        advice += _RESUMES
    return QvlError(f"{path}: {e.strerror or e}; {advice}")


def _inside(path: str | Path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False
