"""Columnar data files (Parquet, Arrow IPC file or stream, CSV): row counts, ids and row ranges via pyarrow.

A columnar file is never read whole: its row count comes from its metadata (Parquet footer, IPC file
footer) or one streamed pass over its record batches (IPC stream, CSV), and a task reads only the
Parquet row groups / record batches that overlap its rows. Rows come out as Python dicts (pyarrow's
``to_pylist``), the same shape a JSON row has, so the same conversion rules apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from qvl_data.errors import QvlError

COLUMNAR_SUFFIXES = (".parquet", ".arrow", ".csv")


def is_columnar(path: str | Path) -> bool:
    return Path(path).suffix in COLUMNAR_SUFFIXES


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file or stream (``datasets.save_to_disk`` writes streams)."""
    try:
        reader = ipc.open_file(pa.memory_map(str(path)))
        for k in range(reader.num_record_batches):
            yield reader.get_batch(k)
        return
    except pa.ArrowInvalid:
        pass
    with pa.memory_map(str(path)) as source:
        yield from ipc.open_stream(source)


def _batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1024)
        elif path.suffix == ".arrow":
            for batch in _arrow_batches(path):
                yield batch.select(columns) if columns is not None else batch
        else:
            options = pa_csv.ConvertOptions(include_columns=columns) if columns is not None else None
            yield from pa_csv.open_csv(path, convert_options=options)
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise QvlError(f"{path}: not readable as {path.suffix[1:]} ({e})") from None


def column_names(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).schema_arrow.names
    for batch in _batches(path):
        return batch.schema.names
    return []


def count_and_ids(path: Path) -> tuple[int, list[Any] | None]:
    """(rows, the ``id`` column's values or None): the Parquet footer and the id column only."""
    has_id = "id" in column_names(path)
    if path.suffix == ".parquet" and not has_id:
        return pq.ParquetFile(path).metadata.num_rows, None
    rows, ids = 0, [] if has_id else None
    for batch in _batches(path, ["id"] if has_id else None):
        rows += batch.num_rows
        if ids is not None:
            ids += batch.column(0).to_pylist()
    return rows, ids


def read_rows(path: Path, start: int, end: int) -> Iterator[dict[str, Any]]:
    """Rows ``start .. end - 1`` of a columnar file; a Parquet file reads only the row groups they are in."""
    if path.suffix == ".parquet":
        file = pq.ParquetFile(path)
        first = 0
        for group in range(file.metadata.num_row_groups):
            n = file.metadata.row_group(group).num_rows
            if first + n > start and first < end:
                table = file.read_row_group(group)
                yield from table.slice(
                    max(start - first, 0), min(end, first + n) - max(start, first)
                ).to_pylist()
            first += n
        return
    first = 0
    for batch in _batches(path):
        n = batch.num_rows
        if first + n > start and first < end:
            lo = max(start - first, 0)
            yield from batch.slice(lo, min(end, first + n) - first - lo).to_pylist()
        first += n
        if first >= end:
            return
