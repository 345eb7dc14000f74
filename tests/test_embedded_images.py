"""Images embedded in the rows (raw bytes, ``{bytes, path}`` structs, the Hugging Face ``Image`` layout):
built exactly as LLaMA-Factory 0.9.5 builds them, with the tokens and pixels of the same image as a file,
through the same checks, and kept by ``convert``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import png_header_only, register_dataset, write_image

from qvl_data.cli import main
from qvl_data.shards import ShardSet

LF = Path(__file__).parent / "fixtures" / "lf095"
EMBEDDED = ["fmt_embedded_struct_parquet", "fmt_embedded_bytes_parquet", "fmt_embedded_hf_image_parquet"]
FILES = {"fmt_paths_json": "formats/paths.json"} | {
    name: f"formats/{name[4:].removesuffix('_parquet')}.parquet" for name in EMBEDDED
}


def _labels(row: dict) -> list[int]:
    labels = [-100] * len(row["input_ids"])
    for start, end in row["label_spans"]:
        labels[start:end] = row["input_ids"][start:end]
    return labels


def _build(out: Path, datasets: list[str], *args: str, dataset_dir: Path = LF / "data") -> ShardSet:
    command = ["build", "--dataset-dir", str(dataset_dir), "--dataset", ",".join(datasets), "--out", str(out)]
    result = CliRunner().invoke(main, [*command, "--quiet", *args])
    assert result.exit_code == 0, result.output
    return ShardSet(out)


@pytest.mark.parametrize(
    ("template", "args"),
    [
        ("qwen2_vl", ("--pixel-format", "uint8")),
        ("qwen2_vl", ("--pixel-format", "webp")),
        ("qwen3_vl", ("--model", "qwen3-vl")),
    ],
)
def test_embedded_images_build_like_llamafactory_and_like_the_same_files(tmp_path, template, args):
    run = json.load(gzip.open(LF / "expected" / f"{template}.formats.json.gz"))
    rows = _build(tmp_path / "out", ["fmt_paths_json", *EMBEDDED], *args)
    built = {(FILES[rows.row(i)["source"]], rows.row(i)["index"]): i for i in range(len(rows))}
    lf_rows = [r for r in run["rows"] if r["dataset"] in FILES.values()]
    assert len(lf_rows) == len(built) == 8
    for lf in lf_rows:  # tokens, labels and grids: LF's, for files and embedded bytes alike
        row = rows.row(built[(lf["dataset"], lf["index"])])
        assert row["input_ids"] == lf["input_ids"] and row["labels"] == _labels(lf), lf["dataset"]
        assert row["image_grid_thw"] == lf["image_grid_thw"], lf["dataset"]
    for index in (0, 1):  # pixels: the file's, bit for bit (one store entry per distinct image)
        file_row = built[("formats/paths.json", index)]
        for name in EMBEDDED:
            i = built[(FILES[name], index)]
            assert rows.row(i)["image_keys"] == rows.row(file_row)["image_keys"]
            assert np.array_equal(rows.read_pixel_patches(i), rows.read_pixel_patches(file_row))
    assert sum(s.entries for s in rows.manifest.image_store.shards) == 3  # 3 distinct images in 8 rows
    names = {name: rows.row(built[(FILES[name], 1)])["images"] for name in EMBEDDED}
    # a struct without a path, and raw bytes, are named by file, row and field
    assert names["fmt_embedded_struct_parquet"] == [
        "embedded_struct.parquet#1/images[0]",
        "embedded_struct.parquet#1/images[1]",
    ]
    assert names["fmt_embedded_bytes_parquet"][1] == "embedded_bytes.parquet#1/images[1]"


def test_embedded_bombs_and_corrupt_bytes_are_rejected_naming_the_row_and_field(tmp_path):
    write_image(tmp_path / "good.png", (64, 48))
    good = (tmp_path / "good.png").read_bytes()
    images = [
        [{"bytes": good, "path": None}],
        [{"bytes": png_header_only(12000, 12000), "path": "bomb.png"}],  # refused before decoding
        [{"bytes": b"not an image at all", "path": None}],  # unreadable header
        [{"bytes": good[: len(good) // 2], "path": None}],  # a header, then the data cut short
        [{"bytes": None, "path": None}],  # neither bytes nor path
    ]
    messages = [[{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "this"}]]
    table = pa.table({"messages": messages * len(images), "images": images})
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(table, data / "rows.parquet")
    register_dataset(data, "rows", "rows.parquet")
    rows = _build(tmp_path / "out", ["rows"], dataset_dir=data)
    assert len(rows) == 1 and rows.row(0)["images"] == ["rows.parquet#0/images[0]"]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    got = {r["index"]: (r["reason"], r["message"]) for r in rejected}
    assert {i: reason for i, (reason, _) in got.items()} == {
        1: "image_too_large",
        2: "image_unreadable",
        3: "image_unreadable",
        4: "invalid_type",
    }
    assert "row 1" in got[1][1] and "images[0] 'bomb.png'" in got[1][1] and "12000x12000" in got[1][1]
    assert "images[0] 'rows.parquet#2/images[0]'" in got[2][1]
    assert "images[0] 'rows.parquet#3/images[0]'" in got[3][1] and "row 3" in got[3][1]


def test_convert_keeps_embedded_image_bytes(tmp_path):
    out = tmp_path / "unified.parquet"
    args = [
        "convert",
        "--dataset-dir",
        str(LF / "data"),
        "--dataset",
        "fmt_embedded_bytes_parquet,fmt_paths_json",
    ]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = pq.read_table(out).to_pylist()
    source = pq.read_table(LF / "data" / "formats" / "embedded_bytes.parquet").column("images").to_pylist()
    embedded = [r for r in records if r["source"] == "fmt_embedded_bytes_parquet"]
    assert [r["image_bytes"] for r in embedded] == source
    assert embedded[0]["images"] == ["embedded_bytes.parquet#0/images[0]"]
    files = [r for r in records if r["source"] == "fmt_paths_json"]
    assert all(b is None for r in files for b in r["image_bytes"]) and files[0]["images"][0].endswith(".png")
