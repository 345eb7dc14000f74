"""What the inference commands read and write.

* Every file they read must be a regular file: opening a FIFO blocks until something writes to it, so
  a named pipe passed as a benchmark or dataset file would hang the command forever.
* An output file replaces an existing one only when qvl wrote that one (each output kind says how it
  recognizes its own files) or ``--overwrite`` says so, and never a file the command reads.
* An output is written to a temporary file next to it and renamed over it when complete, so a failed
  or interrupted run leaves the previous complete output as it was.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from qvl_data.errors import QvlError
from qvl_data.files import atomic_file, file_kind, regular_file


def require_regular_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a regular file (symbolic links followed), else a one-line error naming it
    (:func:`qvl_data.files.regular_file`, the one check every command uses)."""
    regular_file(path, what)
    return Path(path)


def _inside(target: Path, inputs: Iterable[str | Path]) -> Path | None:
    """The input that ``target`` is, or lies inside (an input directory), if any."""
    resolved = Path(os.path.realpath(target))
    for item in inputs:
        source = Path(os.path.realpath(item))
        if resolved == source or (source.is_dir() and resolved.is_relative_to(source)):
            return Path(item)
    return None


def check_output_file(
    path: str | Path,
    what: str,
    is_ours: Callable[[Path], bool],
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> None:
    """Refuse, in one line, to write ``path`` where it would destroy what qvl did not write: a file the
    command reads (or a path inside an input directory), always; a path that is not a regular file,
    always; an existing file that ``is_ours`` does not recognize, unless ``overwrite``."""
    path = Path(path)
    source = _inside(path, inputs)
    if source is not None:
        same = os.path.realpath(source) == os.path.realpath(path)
        where = "is" if same else "is inside"
        raise QvlError(f"{path}: the {what} {where} {source}, which this command reads; choose another path")
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # a new file (a file where its folder should be is reported when the folder is made)
    except OSError as e:
        raise QvlError(f"{path}: cannot check the {what} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise QvlError(f"{path}: the {what} is {file_kind(mode)}, not a file qvl can replace")
    if not overwrite and not is_ours(path):
        raise QvlError(
            f"{path}: exists and is not a {what} qvl wrote; choose another path or pass --overwrite to "
            "replace it"
        )


def check_output_dir(path: str | Path, option: str) -> None:
    """A directory the command writes into must be one (or not exist yet)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QvlError(f"{option} {path} is not a directory")


def prepare_output_dir(path: str | Path) -> None:
    """Create the folder outputs go to and check that it takes files, before hours of generation rather
    than at their end."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QvlError(f"{path}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise QvlError(f"{path}: the output folder is not writable; choose another or fix its permissions")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[IO[str]]:
    """A text file to write ``path``'s new content into (:func:`qvl_data.files.atomic_file`): renamed over
    ``path`` only when the block ends without an error; a failure is one line."""
    path = Path(path)
    opened = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w", encoding="utf-8") as file:
            opened = True
            yield file
    except OSError as e:
        if not opened:
            raise QvlError(
                f"{path}: cannot write it ({e.strerror}); check the folder and its permissions"
            ) from None
        raise QvlError(f"{path}: not written ({e.strerror or e}); the previous file is unchanged") from None
