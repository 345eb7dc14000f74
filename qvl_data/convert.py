"""``qvl-data convert``: rows -> unified records as Parquet (structural validation, no tokenization).

Images are checked to exist (and to stay inside the dataset folder) but are not decoded: a corrupt image
passes ``convert`` and is rejected by ``build`` / ``validate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qvl_data.build import read_options, resolve_dataset_dir
from qvl_data.config import BuildConfig
from qvl_data.files import environment_error, refuse_foreign
from qvl_data.lock import exclusive_lock
from qvl_data.report import is_rejection_list
from qvl_data.schema import UNIFIED_ARROW_SCHEMA, Rejection, records_to_table, rejection_line
from qvl_data.sources import iter_records, resolve_datasets


@dataclass(frozen=True)
class ConvertResult:
    written: int
    rejected: int
    rejected_path: Path  # the rows that failed the structural checks, one JSON object per line


def rejected_path_for(out: Path) -> Path:
    """Where ``convert`` lists the rejected rows of ``out``: ``<out stem>.rejected.jsonl`` beside it."""
    return out.with_name(out.stem + ".rejected.jsonl")


def is_unified_parquet(path: Path) -> bool:
    """Whether ``path`` is a Parquet file of qvl's unified records (what an earlier convert wrote)."""
    try:
        return pq.read_schema(path).equals(UNIFIED_ARROW_SCHEMA)
    except (OSError, ValueError, pa.ArrowException):
        return False


def lock_path(out: Path) -> Path:
    """The lock of a convert into ``out``: beside it (``.<name>.qvl-convert.lock``, removed when it ends)."""
    return out.parent / f".{out.name}.qvl-convert.lock"


def convert_to_parquet(config: BuildConfig, out: Path, batch_rows: int = 1024) -> ConvertResult:
    """Stream records into ``out`` and rejections into :func:`rejected_path_for`, both atomically.

    Both files are written as ``*.tmp`` and renamed only when the whole run succeeded, so a failed run
    (e.g. invalid JSON in the second dataset) leaves no ``*.tmp`` and keeps the previous output. An existing
    ``out`` is replaced only when it is an earlier convert's Parquet, and an existing rejected list only
    when it is one (:func:`qvl_data.report.is_rejection_list`): anything else stops the run, untouched.
    A second convert into the same ``out`` (whose ``.tmp`` files it would share) stops at :func:`lock_path`.
    """
    out = Path(out)
    rejected_path = rejected_path_for(out)
    refuse_foreign(out, is_unified_parquet, "unified-schema Parquet file", "--out")
    refuse_foreign(rejected_path, is_rejection_list, "rejected-rows list", "--out")
    dataset_dir = resolve_dataset_dir(config)
    specs = resolve_datasets(dataset_dir, config.dataset_names)
    options = read_options(config, dataset_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        advice = "wait for it to finish, or choose another --out"
        with exclusive_lock(lock_path(out), out, "qvl-data convert", advice, remove=True):
            return _convert(specs, options, out, rejected_path, batch_rows)
    except OSError as e:
        raise environment_error(e, out.parent, resumable=False) from None


def _convert(specs: list, options: Any, out: Path, rejected_path: Path, batch_rows: int) -> ConvertResult:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, rejected_tmp = out.with_name(out.name + ".tmp"), rejected_path.with_name(rejected_path.name + ".tmp")
    written = rejected = 0
    batch: list = []
    try:
        with (
            pq.ParquetWriter(tmp, UNIFIED_ARROW_SCHEMA) as writer,
            open(rejected_tmp, "w", encoding="utf-8") as rej,
        ):
            for item in iter_records(specs, options):
                if isinstance(item, Rejection):
                    rej.write(rejection_line(item))
                    rejected += 1
                    continue
                batch.append(item)
                if len(batch) >= batch_rows:
                    writer.write_table(records_to_table(batch))
                    written, batch = written + len(batch), []
            if batch:
                writer.write_table(records_to_table(batch))
                written += len(batch)
        os.replace(tmp, out)
        os.replace(rejected_tmp, rejected_path)
    finally:
        tmp.unlink(missing_ok=True)
        rejected_tmp.unlink(missing_ok=True)
    return ConvertResult(written, rejected, rejected_path)
