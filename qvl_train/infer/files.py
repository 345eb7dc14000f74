"""What the inference commands read and write.

* Every file they read must be a regular file: opening a FIFO blocks until something writes to it, so
  a named pipe passed as a benchmark or dataset file would hang the command forever.
* An output file replaces an existing one only when qvl wrote that one (each output kind says how it
  recognizes its own files) or ``--overwrite`` says so, and never a file the command reads: the data
  commands' rule (:func:`qvl_data.files.refuse_foreign`), with ``--overwrite`` and the inputs.
* An output is written to a temporary file next to it and renamed over it when complete, so a failed
  or interrupted run leaves the previous complete output as it was.
* A command that writes several files into one output (``score``'s folder, ``export``'s model directory)
  holds that output's lock (:func:`output_lock`), so that two runs never mix their files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from qvl_data.errors import QvlError
from qvl_data.files import atomic_file, regular_file
from qvl_data.lock import exclusive_lock


def require_regular_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a regular file (symbolic links followed), else a one-line error naming it
    (:func:`qvl_data.files.regular_file`, the one check every command uses)."""
    regular_file(path, what)
    return Path(path)


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


@contextlib.contextmanager
def output_lock(lock: Path, output: Path, command: str, dist: Any = None) -> Iterator[None]:
    """Hold ``lock`` (:func:`qvl_data.lock.exclusive_lock`, removed on release) for the block: a second
    ``command`` writing ``output`` stops in one line naming the holder (pid, host, since), exit 2. Under
    torchrun (``dist``) rank 0 takes it and its refusal is every rank's."""
    error = None
    with contextlib.ExitStack() as held:
        if dist is None or dist.main:
            advice = "wait for it to finish, or choose another --output-dir"
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(exclusive_lock(lock, output, command, advice, remove=True))
            except QvlError as e:
                error = str(e)
            except OSError as e:
                error = f"{e.filename or lock}: cannot take the lock of {output} ({e.strerror or e})"
        if dist is not None:
            error = dist.broadcast_object(error)
        if error:
            raise QvlError(error)
        yield
