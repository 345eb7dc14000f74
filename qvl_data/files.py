"""File-system utilities shared by every command: the cache directory, staging and atomic publishing of a
cache directory, sha256 of a file, atomic writes, what qvl may read and replace, and how an environment
failure (permissions, a full disk, a file where a folder belongs) becomes one line.

* Every file qvl reads is checked with ``os.stat`` first (:func:`regular_file`): a FIFO would block the
  reader forever, a device never ends.
* A command replaces an existing output only when that output is its own earlier one; it writes through a
  ``.tmp`` sibling and a rename (:func:`write_atomic`), so a failed run leaves the previous file intact.

The one place for each of these rules. It imports only the standard library and ``qvl_data.errors``, so
every other module (processor, demo, shards, the trainer's model and export) can use it without cycles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qvl_data.errors import QvlError

__all__ = [
    "BUILD_MARKER",
    "append_jsonl",
    "atomic_file",
    "cache_dir",
    "environment_error",
    "file_kind",
    "is_regular_file",
    "refuse_foreign",
    "regular_file",
    "write_atomic",
    "contents_intact",
    "fsync_and_replace",
    "publish_directory",
    "read_marker",
    "refuse_special_files",
    "sha256_file",
    "staging_directory",
    "write_json_atomic",
    "write_marker",
]

#: A provenance file written last into a cache directory qvl built: its presence means the rest is
#: complete, and the sizes and sha256s it records tell a damaged entry from a good one.
BUILD_MARKER = ".qvl-build.json"
_STALE_TMP_SECONDS = 3600.0


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Return qvl's cache directory: ``$QVL_CACHE`` if set, else ``~/.cache/qvl`` (created on demand).

    A one-line QvlError when it cannot be a directory (``QVL_CACHE`` names a file, no permission).
    """
    env = os.environ.get("QVL_CACHE")
    path = Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "qvl"
    source = "QVL_CACHE" if env else "the default cache ~/.cache/qvl"
    if path.exists() and not path.is_dir():
        raise QvlError(f"{path}: {source} is not a directory; point QVL_CACHE at a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QvlError(
            f"{path}: cannot create {source} ({e.strerror or type(e).__name__}); "
            "point QVL_CACHE at a writable directory"
        ) from None
    return path


def staging_directory(out_dir: Path) -> Path:
    """A fresh, empty ``.<name>.tmp-*`` directory next to ``out_dir`` to build a cache entry in.

    Stale staging directories of killed builders (over an hour old) are removed first. The directory is
    world-readable like the finished cache entry will be; publish it with :func:`publish_directory`.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the finished directory is a shared cache
    return tmp_dir


def publish_directory(tmp_dir: Path, out_dir: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename a finished cache directory onto ``out_dir`` (a directory rename is atomic on one filesystem).

    The one implementation of qvl's cache publishing (embedded processor, demo data, tiny model, export):
    readers see either nothing or a complete directory. If ``out_dir`` already passes ``is_complete`` (a
    concurrent builder won the race; builds are deterministic), it is kept and ``tmp_dir`` is left for
    the caller to delete; anything else there (an incomplete or damaged earlier attempt, a file) is moved
    aside and replaced.
    """
    for _ in range(5):
        try:
            os.rename(tmp_dir, out_dir)
            return
        except OSError:
            if not os.path.lexists(out_dir):
                raise
        if out_dir.is_dir() and is_complete(out_dir):
            return
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:
            continue  # another process moved it first
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    raise OSError(f"could not move {tmp_dir} into place at {out_dir}")


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Delete temporary/old directories that killed builds left next to ``out_dir`` over an hour ago."""
    now = time.time()
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            try:
                if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


# -------------------------------------------------------------------------------------- build marker


def write_marker(directory: Path, files: Iterable[str], info: dict[str, Any]) -> None:
    """Write :data:`BUILD_MARKER` into ``directory``: ``info`` plus the size and sha256 of each of ``files``
    (relative paths). Call it last, once everything else is written."""
    entries = {}
    for name in files:
        path = directory / name
        entries[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json_atomic(directory / BUILD_MARKER, {**info, "files": entries})


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's content, or None when it is missing, not a regular file or not a JSON object."""
    path = directory / BUILD_MARKER
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def contents_intact(directory: Path, marker: dict[str, Any], hashes: bool = False) -> bool:
    """Whether every file ``marker`` records is a regular file of the recorded size (cheap: one ``stat``
    each) and, with ``hashes``, of the recorded sha256. A marker that records no files (written by an
    earlier qvl) passes the size check but never the hash check: nothing in it is verified."""
    entries = marker.get("files", {})
    if not isinstance(entries, dict) or (hashes and not entries):
        return False
    for name, entry in entries.items():
        path = directory / name
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
                return False
            if hashes and sha256_file(path) != entry["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


# -------------------------------------------------------------------------------------- reading files


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


def refuse_special_files(directory: Path, what: str = "directory") -> None:
    """A one-line QvlError naming the first entry of ``directory`` (not recursive) that is neither a
    regular file nor a directory, e.g. a FIFO in place of ``config.json``, which a loader would hang on."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return  # the caller's own check reports a missing or unreadable directory
    for entry in entries:
        try:
            mode = entry.stat().st_mode  # follows symlinks, like the loaders
        except OSError:
            continue  # a dangling symlink: the loader reports it if it needs that file
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise QvlError(
                f"{Path(directory) / entry.name}: not a regular file ({file_kind(mode)}) in the {what}; "
                "qvl reads only regular files"
            )


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a regular file's bytes, read in 1 MiB blocks."""
    regular_file(path, "file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------- writing files


def fsync_and_replace(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable, then visible as ``final`` (``os.replace`` is atomic on one filesystem)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, obj: Any, ensure_ascii: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path.tmp``, fsync it, then rename it onto ``path``: a reader (or
    a re-run after a crash) sees the old file or the new one, never half of one."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8")
    fsync_and_replace(tmp, path)


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record to ``path`` (created if missing). A non-finite float (a NaN loss, an
    evaluation set without trained tokens) is written as null, so every line stays valid JSON."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            finite = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
            }
            f.write(json.dumps(finite, allow_nan=False) + "\n")


@contextmanager
def atomic_file(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file to write ``path``'s new content into: a hidden ``.<name>.tmp-<pid>`` sibling (two processes
    never share one), made durable and renamed over ``path`` when the block ends without an error, removed
    otherwise. Readers see the old file or the new one, never half of one, and a failure leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into an :func:`atomic_file` for ``path``."""
    with atomic_file(path) as f:
        write(f)


def refuse_foreign(
    path: str | Path,
    ours: Callable[[Path], bool],
    what: str,
    option: str,
    overwrite: bool | None = None,
    inputs: Iterable[str | Path] = (),
) -> None:
    """The one rule for "replace only your own earlier output": stop, in one line, before writing ``path``
    (``option``'s value, a ``what``) where that would destroy what qvl did not write. Refused always: a
    file the command reads (one of ``inputs``, or a path inside an input folder) and an existing path
    that is not a regular file; refused unless ``overwrite``: an existing file that ``ours`` does not
    recognize as this command's earlier output. ``overwrite`` None: the command has no ``--overwrite``."""
    path = Path(path)
    source = _input_holding(path, inputs)
    if source is not None:
        where = "is" if os.path.realpath(source) == os.path.realpath(path) else "is inside"
        raise QvlError(
            f"{path}: the {what} {where} {source}, which this command reads; choose another {option}"
        )
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise QvlError(
                f"{path}: the {what} is a broken symbolic link, not a file qvl can replace; choose another "
                f"{option}"
            ) from None
        return  # a new file (a file where its folder should be is reported when the folder is made)
    except OSError as e:
        raise QvlError(f"{path}: cannot check the {what} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise QvlError(
            f"{path}: the {what} is {file_kind(mode)}, not a file qvl can replace; choose another {option}"
        )
    if not overwrite and not ours(path):
        how = "remove the file" if overwrite is None else "pass --overwrite to replace it"
        raise QvlError(
            f"{path}: exists and is not a {what} qvl wrote, and qvl never overwrites a file it did not write: "
            f"choose another {option} or {how}"
        )


def _input_holding(target: Path, inputs: Iterable[str | Path]) -> Path | None:
    """The input that ``target`` is, or lies inside (an input folder), if any."""
    resolved = Path(os.path.realpath(target))
    for item in inputs:
        source = Path(os.path.realpath(item))
        if resolved == source or (source.is_dir() and resolved.is_relative_to(source)):
            return Path(item)
    return None


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
