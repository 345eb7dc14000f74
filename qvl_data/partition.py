"""The partition plan: which input rows form which partition, and how a task reads just its rows.

A build first *indexes* each dataset once (one task per dataset, see :func:`index_dataset`):

* a JSON Lines file (``.jsonl``, or a ``.json`` whose first line is a whole JSON object, which
  LLaMA-Factory reads too) is indexed by the byte offset of each row's line, in place;
* a JSON array file is parsed once and *staged* as JSON Lines in the build's work directory, so that
  tasks can read their rows by byte range as well.

The index cuts each dataset's rows, in order, into partitions of ``partition_rows`` rows (the last one
shorter; a partition never spans two files of a folder dataset). With ``partition_rows = 0`` (auto) the
size is ``max(32, ceil(rows / 1024))``: small datasets get small partitions (many tasks to balance over
the workers), large ones at most ~1024 partitions per dataset (a bounded number of shard files). The plan
depends only on the inputs and that option, never on the worker count or the executor, so every executor
writes the same bytes.

The index also settles ids: a row's id is ``<dataset>:<its "id" field>`` (a string or integer) or
``<dataset>:<row index>``; the first row (in file order) that is a JSON object with a given id keeps it,
and a later row with the same id is rejected as ``duplicate_id``. Ids are compared by a 128-bit BLAKE2b
digest, so the index holds 16 bytes per row whatever the id's length.

Every row is thus parsed at most twice: once by the index, once by its partition's task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qvl_data.errors import QvlError
from qvl_data.files import regular_file
from qvl_data.readers import COLUMNAR_SUFFIXES, column_names, count_and_ids, is_columnar, read_rows

BOM = b"\xef\xbb\xbf"
AUTO_MIN_ROWS = 32
AUTO_MAX_PARTITIONS = 1024
MAX_COLUMNS = 256  # of DatasetIndex.columns: enough to tell a dataset's shape, bounded for odd rows


@dataclass(frozen=True)
class Partition:
    """Rows ``first_row .. first_row + rows - 1`` of dataset ``source``: the non-blank lines of ``row_file``
    between bytes ``start`` and ``end``. ``file`` is the user's data file (for messages); ``row_file`` is
    that file, or its staged JSON Lines copy for a JSON array. ``duplicates`` maps a row of this partition
    whose id an earlier row already has to that earlier row."""

    index: int
    source: str
    file: str
    row_file: str
    first_row: int
    rows: int
    start: int
    end: int
    duplicates: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class DatasetIndex:
    source: str
    rows: int
    partition_rows: int
    partitions: list[dict[str, Any]]  # Partition fields without the global index
    columns: list[str] = field(default_factory=list)  # top-level fields seen in any row (at most MAX_COLUMNS)


def partition_size(rows: int, partition_rows: int) -> int:
    """Rows per partition: ``partition_rows`` as given, or the auto rule of the module docstring for 0."""
    if partition_rows > 0:
        return partition_rows
    return max(AUTO_MIN_ROWS, math.ceil(rows / AUTO_MAX_PARTITIONS))


def data_files(path: Path) -> list[Path]:
    """The data files of a dataset's ``file_name``: the file itself, or for a folder (as LLaMA-Factory
    reads it) every ``.json``/``.jsonl`` file in it, in name order, or its columnar files
    (``.parquet``/``.arrow``/``.csv``; a ``datasets.save_to_disk`` folder: its ``.arrow`` files)."""
    if path.is_dir():
        suffixes = (".json", ".jsonl")
        if (path / "state.json").is_file() and any(path.glob("*.arrow")):  # datasets.save_to_disk
            suffixes = (".arrow",)
        elif not any(p.suffix in suffixes for p in path.iterdir()):
            suffixes = (*COLUMNAR_SUFFIXES, TEXT_SUFFIX)
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes and not p.is_dir())
        if not files:
            raise QvlError(
                f"{path}: folder holds no .json or .jsonl data files (nor .parquet, .arrow, .csv or .txt)"
            )
    else:
        files = [path]
    for file in files:  # a FIFO would block the reader (the fingerprint first) forever
        regular_file(file, "data file")
    return files


# ------------------------------------------------------------------------------------------ row parsing


def parse_row(line: bytes) -> Any:
    """One JSON Lines row -> its value, or a ``json.JSONDecodeError`` describing why it is not one."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return json.JSONDecodeError(f"not UTF-8 text ({e.reason} at byte {e.start})", "", 0)
    except json.JSONDecodeError as e:
        return e
    except RecursionError:  # e.g. [[[[...]]]] 10,000 levels deep: one bad row, not a crashed build
        return json.JSONDecodeError(f"nested more than {sys.getrecursionlimit()} levels deep", "", 0)


def record_id(source: str, index: int, row: Any) -> str | None:
    """The id a row claims (see the module docstring); None for a row that is not a JSON object."""
    if not isinstance(row, dict):
        return None
    row_id = row.get("id")
    return f"{source}:{row_id}" if isinstance(row_id, (str, int)) else f"{source}:{index}"


def read_lines(path: str | Path, start: int, end: int) -> Iterator[bytes]:
    """The non-blank lines of bytes ``start:end`` of a JSON Lines file (a BOM at byte 0 is skipped)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(BOM):
        data = data[len(BOM) :]
    for line in data.split(b"\n"):
        if line.strip():
            yield line


TEXT_SUFFIX = ".txt"


def text_rows(path: str | Path, start: int, end: int) -> Iterator[Any]:
    """The rows of bytes ``start:end`` of a ``.txt`` file as ``datasets``' ``text`` builder gives them
    (LLaMA-Factory's ``txt``): one ``{"text": line}`` per ``\n``-ended line, blank lines included, the
    line end (``\n`` or ``\r\n``) dropped."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the text after the last line end, empty when the file ends with one
        lines.pop()
    for line in lines:
        try:
            yield {"text": line.removesuffix(b"\r").decode("utf-8")}
        except UnicodeDecodeError as e:
            yield json.JSONDecodeError(f"not UTF-8 text ({e.reason} at byte {e.start})", "", 0)


def _text_line_starts(path: Path) -> list[int]:
    """The byte offset of every line of a ``.txt`` file, from one streamed pass."""
    starts, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            starts.append(pos)
            pos += len(line)
    return starts


def partition_rows(partition: Partition) -> Iterator[tuple[int, Any]]:
    """(row index in the dataset, parsed row or JSONDecodeError) for every row of ``partition``."""
    count = 0
    if is_columnar(partition.row_file):  # start/end are row numbers in the file, not bytes
        lines: Iterator[Any] = read_rows(Path(partition.row_file), partition.start, partition.end)
    elif Path(partition.row_file).suffix == TEXT_SUFFIX:
        lines = text_rows(partition.row_file, partition.start, partition.end)
    else:
        lines = (parse_row(line) for line in read_lines(partition.row_file, partition.start, partition.end))
    for count, row in enumerate(lines, 1):
        yield partition.first_row + count - 1, row
    if count != partition.rows:
        raise QvlError(
            f"{partition.file}: changed while building (partition {partition.index} expected "
            f"{partition.rows} rows, found {count}); re-run the build"
        )


# ------------------------------------------------------------------------------------------ file layout


def _first_content(path: Path) -> bytes:
    """The first non-whitespace byte of a file after an optional BOM (b"" when there is none)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head:
            stripped = head.removeprefix(BOM).lstrip()
            if stripped:
                return stripped[:1]
            head = f.read(1 << 16)
    return b""


def _is_json_lines(path: Path) -> bool:
    """JSON Lines: a ``.jsonl`` file, or a ``.json`` file (LLaMA-Factory reads both the same way) whose
    first non-blank line is a whole JSON object and that has more rows after it. A lone object is left to
    the JSON reader, which says it is not a list of rows."""
    if path.suffix == ".jsonl":
        return True
    first = None
    with open(path, "rb") as f:
        for line in f:
            line = line.removeprefix(BOM).strip()
            if not line:
                continue
            if first is not None:
                return True
            if line[:1] != b"{" or isinstance(parse_row(line), json.JSONDecodeError):
                return False
            first = line
    return False


def _load_json_array(path: Path) -> list:
    try:
        with open(path, "rb") as f:
            rows = json.loads(f.read().removeprefix(BOM).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise QvlError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise QvlError(
            f"{path}: a value is nested more than {sys.getrecursionlimit()} levels deep; write the file as "
            "JSON Lines (one row per line) so that such a row is rejected alone"
        ) from None
    except UnicodeDecodeError as e:
        raise QvlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(rows, list):
        raise QvlError(
            f"{path}: expected a JSON list of rows (or JSON Lines, one row per line), got {type(rows).__name__}"
        )
    return rows


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(byte offset, parsed row) of every non-blank line of a JSON Lines file, streamed."""
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            content = line.removeprefix(BOM) if pos == 0 else line
            if content.strip():
                yield pos, parse_row(content)
            pos += len(line)


def _stage(rows: list, staged: Path) -> tuple[np.ndarray, int]:
    """Write a JSON array's rows as JSON Lines (ASCII escapes, so any string round-trips exactly)."""
    offsets, pos = np.empty(len(rows), dtype=np.int64), 0
    tmp = staged.with_name(staged.name + ".tmp")
    with open(tmp, "wb") as f:
        for i, row in enumerate(rows):
            line = (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")
            offsets[i] = pos
            f.write(line)
            pos += len(line)
    os.replace(tmp, staged)
    return offsets, pos


# ------------------------------------------------------------------------------------------ the index


def _id_digest(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def find_duplicates(rows: np.ndarray, digests: bytes) -> dict[int, int]:
    """{row: first row with the same id} for every row whose id an earlier row has.

    ``rows[k]`` is the row index of the k-th id digest (16 bytes each, in row order)."""
    if not len(rows):
        return {}
    words = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    order = np.lexsort((rows, words[:, 1], words[:, 0]))  # by digest, then by row
    w = words[order]
    same = np.all(w[1:] == w[:-1], axis=1)
    duplicates: dict[int, int] = {}
    first = int(rows[order[0]])
    for k in range(1, len(order)):
        if same[k - 1]:
            duplicates[int(rows[order[k]])] = first
        else:
            first = int(rows[order[k]])
    return duplicates


def index_dataset(source: str, path: str, partition_rows: int, stage_dir: str) -> DatasetIndex:
    """Index one dataset (a file, or a folder of files): row offsets, partitions and duplicate ids.

    Runs as a task (in a worker or on a Ray node): it parses every row once; the driver only receives
    the partition boundaries and the few duplicate ids."""
    per_file: list[tuple[Path, Path, np.ndarray, int]] = []  # (file, row file, offsets, size)
    id_rows = array("q")  # 8 bytes per row, not a Python int each
    digests = bytearray()
    columns: set[str] = set()

    def claim(row_index: int, row: Any) -> None:
        if isinstance(row, dict) and len(columns) < MAX_COLUMNS:
            columns.update(k for k in row if isinstance(k, str))
        row_id = record_id(source, row_index, row)
        if row_id is not None:
            id_rows.append(row_index)
            digests.extend(_id_digest(row_id))

    first = 0
    for n_file, file in enumerate(data_files(Path(path))):
        if is_columnar(file):
            n_rows, ids = count_and_ids(file)
            columns.update(column_names(file))
            for k in range(n_rows):
                claim(first + k, {"id": ids[k]} if ids is not None else {})
            per_file.append((file, file, np.arange(n_rows, dtype=np.int64), n_rows))
            first += n_rows
            continue
        if file.suffix == TEXT_SUFFIX:
            starts = _text_line_starts(file)
            columns.add("text")
            for k in range(len(starts)):
                claim(first + k, {})
            per_file.append((file, file, np.asarray(starts, dtype=np.int64), file.stat().st_size))
            first += len(starts)
            continue
        if not _first_content(file):
            raise QvlError(f"{file}: the file is empty (a dataset with no rows is written `[]`)")
        if _is_json_lines(file):
            row_file, starts = file, []
            for k, (pos, row) in enumerate(_json_lines(file)):
                starts.append(pos)
                claim(first + k, row)
            offsets, size = np.asarray(starts, dtype=np.int64), file.stat().st_size
        else:
            json_rows = _load_json_array(file)
            row_file = Path(stage_dir) / f"{source}.{n_file}.jsonl"
            offsets, size = _stage(json_rows, row_file)
            for k, row in enumerate(json_rows):
                claim(first + k, row)
            del json_rows
        per_file.append((file, row_file, offsets, size))
        first += len(offsets)

    size_rows = partition_size(first, partition_rows)
    duplicates = sorted(find_duplicates(np.frombuffer(id_rows, dtype=np.int64), bytes(digests)).items())
    dup_rows = [r for r, _ in duplicates]
    partitions, first = [], 0
    for file, row_file, offsets, size in per_file:
        for k in range(0, len(offsets), size_rows):
            n = min(size_rows, len(offsets) - k)
            lo, hi = bisect_left(dup_rows, first + k), bisect_left(dup_rows, first + k + n)
            partitions.append(
                {
                    "source": source,
                    "file": str(file),
                    "row_file": str(row_file),
                    "first_row": first + k,
                    "rows": n,
                    "start": int(offsets[k]),
                    "end": int(offsets[k + n]) if k + n < len(offsets) else size,
                    "duplicates": tuple(duplicates[lo:hi]),
                }
            )
        first += len(offsets)
    return DatasetIndex(
        source=source, rows=first, partition_rows=size_rows, partitions=partitions, columns=sorted(columns)
    )


def make_plan(indexes: list[DatasetIndex]) -> list[Partition]:
    """All partitions of all datasets, in dataset order then row order, numbered from 0."""
    plan = []
    for index in indexes:
        for p in index.partitions:
            plan.append(Partition(index=len(plan), **p))
    return plan
