"""Parquet, Arrow (IPC file and stream), CSV and save_to_disk inputs read like JSON, and a Parquet task
reads only its own row groups."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qvl_data.encode import EncodeOptions, encode_record
from qvl_data.partition import index_dataset, make_plan, partition_rows
from qvl_data.processor import load_image_processor, load_tokenizer
from qvl_data.sources import ReadOptions, iter_records, resolve_datasets

LF = Path(__file__).parent / "fixtures" / "lf095"
COLUMNAR = [
    "fmt_alpaca_parquet",
    "fmt_alpaca_csv",
    "fmt_alpaca_arrow_stream",
    "fmt_alpaca_arrow_file",
    "fmt_alpaca_save_to_disk",
]


def _labels(row: dict) -> list[int]:
    labels = [-100] * len(row["input_ids"])
    for start, end in row["label_spans"]:
        labels[start:end] = row["input_ids"][start:end]
    return labels


def test_columnar_files_match_llamafactory_095():
    expected = json.load(gzip.open(LF / "expected" / "qwen2_vl.formats.json.gz"))
    settings = expected["settings"]
    options = EncodeOptions(
        cutoff_len=settings["cutoff_len"],
        image_max_pixels=settings["image_max_pixels"],
        image_min_pixels=settings["image_min_pixels"],
    )
    tokenizer, image_processor = load_tokenizer(None), load_image_processor(None)
    # LF's save_to_disk run failed ("File types should be identical"); its rows are the JSON alpaca rows.
    assert expected["file_errors"] == {
        "formats/alpaca_5_saved": "ValueError: File types should be identical."
    }
    files = {"fmt_alpaca_save_to_disk": "formats/alpaca_5.parquet"}
    for name in COLUMNAR:
        specs = resolve_datasets(LF / "data", [name])
        file = files.get(name, str(specs[0].path.relative_to(LF / "data")))
        lf_rows = sorted((r for r in expected["rows"] if r["dataset"] == file), key=lambda r: r["index"])
        assert len(lf_rows) == 5, name
        records = list(iter_records(specs, ReadOptions(dataset_dir=LF / "data")))
        assert [r["index"] for r in records] == [0, 1, 2, 3, 4], name
        for record, lf in zip(records, lf_rows, strict=True):
            row = encode_record(record, tokenizer, image_processor, options)
            assert row.input_ids == lf["input_ids"], name
            assert row.labels == _labels(lf), name


def test_parquet_task_reads_only_its_row_groups(tmp_path, monkeypatch):
    rows = [{"instruction": f"q{i} " + "x" * 2000, "output": f"a{i}"} for i in range(400)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    read_groups: list[int] = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        read_groups.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    index = index_dataset("big", str(path), 100, str(tmp_path))
    assert read_groups == []  # indexed from the footer (no id column)
    plan = make_plan([index])
    assert [(p.first_row, p.rows) for p in plan] == [(0, 100), (100, 100), (200, 100), (300, 100)]
    got = list(partition_rows(plan[2]))
    assert read_groups == [2]
    assert [i for i, _ in got] == list(range(200, 300))
    assert got[0][1]["output"] == "a200"


def test_image_placeholder_in_system_prompt_is_rejected_naming_the_field(tmp_path):
    rows = [{"instruction": "hi", "output": "ok", "system": "Look at <image> please"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    info = {"d": {"file_name": "d.json", "columns": {"system": "system"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (item,) = iter_records(resolve_datasets(tmp_path, ["d"]), ReadOptions(dataset_dir=tmp_path))
    assert item.reason == "image_in_system"
    assert "field system (the system prompt) contains <image>" in item.message


def test_alpaca_file_declared_sharegpt_fails_the_run_naming_the_fitting_formatting(tmp_path):
    from helpers import write_dataset

    from qvl_data.build import build
    from qvl_data.config import BuildConfig
    from qvl_data.errors import QvlError

    write_dataset(tmp_path, "d", [{"instruction": "hi", "output": "ok"}] * 3, formatting="sharegpt")
    config = BuildConfig(
        dataset_dir=str(tmp_path), dataset="d", out=str(tmp_path / "out"), num_proc=1, quiet=True
    )
    try:
        build(config)
    except QvlError as e:
        message = str(e)
    else:
        raise AssertionError("the build did not fail")
    assert "declared sharegpt but no row has the column 'messages'" in message
    assert '"formatting": "alpaca"' in message and "\n" not in message
