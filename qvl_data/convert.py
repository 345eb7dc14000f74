"""``qvl-data convert``: rows -> unified records as Parquet (structural validation, no tokenization)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from qvl_data.build import read_options, resolve_dataset_dir
from qvl_data.config import BuildConfig
from qvl_data.schema import UNIFIED_ARROW_SCHEMA, Rejection, records_to_table
from qvl_data.sources import iter_records, resolve_datasets


def convert_to_parquet(config: BuildConfig, out: Path, batch_rows: int = 1024) -> tuple[int, int]:
    """Stream records into ``out`` (atomically) and rejections into ``<out stem>.rejected.jsonl``."""
    dataset_dir = resolve_dataset_dir(config)
    specs = resolve_datasets(dataset_dir, config.dataset_names)
    options = read_options(config, dataset_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    written = rejected = 0
    batch: list = []
    with (
        pq.ParquetWriter(tmp, UNIFIED_ARROW_SCHEMA) as writer,
        open(rejected_path, "w", encoding="utf-8") as rej,
    ):
        for item in iter_records(specs, options):
            if isinstance(item, Rejection):
                rej.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
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
    return written, rejected
