"""qvl-data stats: the demo build's figures, the rendered tables, and that pixel data is never read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import processor_summary

from qvl_data import image_store, shards
from qvl_data.cli import main
from qvl_data.encode import EncodedRow
from qvl_data.format import (
    QWEN2_VL_GEOMETRY,
    BuildOptions,
    ImageStoreSection,
    Manifest,
    Rejected,
    SourceTotals,
)
from qvl_data.stats import compute_stats, stats_frames


@pytest.fixture(scope="module")
def demo_stats(demo_build: Path) -> dict:
    result = CliRunner().invoke(main, ["stats", str(demo_build), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_totals_match_the_reference(demo_stats: dict) -> None:
    t = demo_stats["totals"]
    assert (t["rows"], t["tokens"], t["trained_tokens"], t["image_tokens"], t["images"]) == (
        1096,
        190128,
        149759,
        550,
        8,
    )
    assert t["trained_ratio"] == round(149759 / 190128, 4)
    assert (t["truncated"], t["rejected"], t["max_length"], t["rows_without_trained_tokens"]) == (
        0,
        0,
        672,
        0,
    )


@pytest.mark.parametrize(
    ("source", "rows", "tokens", "trained", "max_length", "image_tokens", "images"),
    [
        ("mllm_demo", 6, 1025, 245, 195, 550, 8),
        ("identity", 91, 4895, 2684, 96, 0, 0),
        ("alpaca_en_demo", 999, 184208, 146830, 672, 0, 0),
    ],
)
def test_json_per_source(
    demo_stats: dict, source, rows, tokens, trained, max_length, image_tokens, images
) -> None:
    s = demo_stats["sources"][source]
    assert (s["rows"], s["tokens"], s["trained_tokens"], s["max_length"]) == (
        rows,
        tokens,
        trained,
        max_length,
    )
    assert (s["image_tokens"], s["images"], s["rejected"]) == (image_tokens, images, 0)
    assert s["trained_ratio"] == round(trained / tokens, 4)
    assert demo_stats["lengths"][source]["max"] == max_length


def test_json_lengths_images_storage(demo_stats: dict) -> None:
    all_ = demo_stats["lengths"]["all"]
    assert all_["p50"] <= all_["p90"] <= all_["p99"] <= all_["max"] == 672
    assert all_["mean"] == round(190128 / 1096, 1)
    hist = demo_stats["length_histogram"]
    assert sum(b["rows"] for b in hist["bins"]) == 1096
    assert hist["bins"][0]["from"] == 0 and hist["bins"][-1]["from"] <= 672 < hist["bins"][-1]["to"]
    assert demo_stats["images_per_row"] == [
        {"images": 0, "rows": 1090},
        {"images": 1, "rows": 4},
        {"images": 2, "rows": 2},
    ]
    assert demo_stats["grids"] == [
        {"grid": [1, 12, 22], "images": 6, "tokens_per_image": 66, "processed_size": [308, 168]},
        {"grid": [1, 14, 22], "images": 2, "tokens_per_image": 77, "processed_size": [308, 196]},
    ]
    assert demo_stats["rejected"] == {"total": 0, "by_reason": {}}
    storage = demo_stats["storage"]
    # one shard per partition: mllm_demo 1, identity 3 and alpaca_en_demo 32 partitions of 32 rows (auto)
    assert storage["shards"] == 36 and storage["pixel_format"] == "uint8"
    # the store keeps each of the 3 distinct images once (8 uses): patches x 588 bytes
    assert storage["distinct_images"] == 3
    assert storage["pixel_bytes"] == (2 * 12 * 22 + 14 * 22) * 588
    assert storage["pixel_bytes_per_image"] == round(storage["pixel_bytes"] / 3, 1)
    assert storage["bytes_per_row"] == round(storage["bytes"] / 1096, 1)
    assert demo_stats["warnings"] == []


def test_rendered_tables(demo_build: Path) -> None:
    result = CliRunner(env={"COLUMNS": "100"}).invoke(
        main, ["stats", str(demo_build)], catch_exceptions=False
    )
    assert result.exit_code == 0
    out = result.stdout
    assert "\x1b[" not in out
    lines = [line.split() for line in out.splitlines()]
    assert ["mllm_demo", "6", "1,025", "245", "23.9%", "550", "8", "0", "0"] in lines
    assert ["total", "1,096", "190,128", "149,759", "78.8%", "550", "8", "0", "0"] in lines
    assert ["1×12×22", "6", "66", "308×168"] in lines
    assert ["0", "1,090"] in lines  # rows without images
    assert "length histogram (bins of 50 tokens)" in out and "█" in out
    assert "rejected rows: none" in out


def test_stats_frames(demo_build: Path) -> None:
    frames = stats_frames(compute_stats(demo_build))
    sources = frames["sources"]
    assert sources["source"].to_list() == ["mllm_demo", "identity", "alpaca_en_demo", "total"]
    assert sources.filter(sources["source"] == "total")["trained_tokens"].item() == 149759
    assert frames["grids"].height == 2 and frames["rejected"].height == 0


# ----------------------------------------------------------------------- pixels are never read


def _synthetic_build(out: Path, rows: int, side: int) -> int:
    """A valid shard dir whose rows each hold one side x side-patch image; returns the pixel bytes."""
    writer = shards.ShardWriter(out, "uint8", max_shard_bytes=32 << 20)
    pixels = np.full((side * side, 588), 7, dtype=np.uint8)
    store = out / image_store.STORE_DIR / "synthetic"
    keys = sorted(hashlib.sha256(f"big:{i}".encode()).hexdigest() for i in range(rows))
    image_shards = []
    for key in keys:  # one image shard per image, each in its key's bucket
        columns = {
            "key": [key],
            "image_grid_thw": [[1, side, side]],
            "image_sizes": [[side * 14] * 4],
            "pixels": [pixels],
            "pixels_sha256": [""],
            "error_code": [None],
            "error_message": [None],
        }
        path = image_store.write_image_shard(
            store, image_store.bucket_of(key), columns, "uint8", QWEN2_VL_GEOMETRY
        )
        image_shards.append(image_store.image_shard_entry(store, path))
    for i, key in enumerate(keys):
        ids = [1, 151652] + [151655] * (side * side // 4) + [151653, 2, 3]
        labels = [-100] * (len(ids) - 2) + [2, 3]
        writer.write(
            EncodedRow(
                id=f"big:{i}",
                source="big",
                index=i,
                input_ids=ids,
                labels=labels,
                truncated=False,
                image_paths=["big.png"],
                image_grid_thw=[(1, side, side)],
                image_sizes=[(side * 14, side * 14, side * 14, side * 14)],
                image_keys=[key],
            )
        )
    infos = writer.close()
    totals = SourceTotals(
        rows=rows,
        tokens=sum(s.tokens for s in infos),
        trained_tokens=2 * rows,
        image_tokens=rows * side * side // 4,
        images=rows,
        max_length=side * side // 4 + 5,
    )
    manifest = Manifest(
        fingerprint="",
        qvl_version="",
        dataset_dir="",
        datasets=["big"],
        options=BuildOptions(1 << 20, 262144, 1024, False, "uint8", [], 0),
        processor=processor_summary(),
        versions={},
        input_rows=rows,
        totals=totals,
        sources={"big": totals},
        rejected=Rejected(),
        shards=infos,
        partitions=[],
        image_store=ImageStoreSection(image_store.STORE_DIR, "synthetic", rows, image_shards),
    )
    shards.write_json_atomic(out / shards.MANIFEST, manifest.to_dict())
    return rows * side * side * 588


# Runs in a fresh process so that its peak RSS (which counts the mapped shard pages it touches) is its own.
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import pyarrow.compute as pc
    from qvl_data.shards import ShardSet
    from qvl_data.stats import compute_stats

    def peak():
        # VmHWM: this process's peak resident set, file-backed (mapped shard) pages included. Not
        # ru_maxrss, which on Linux keeps the parent's peak across fork + exec.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    compute_stats(sys.argv[2])  # warm-up on a small build: polars thread pool, allocator arenas
    before = peak()
    stats = compute_stats(sys.argv[1])
    after_stats = peak()
    # Control: reading the pixel buffers the way a consumer would must show up in the same measure.
    images = ShardSet(sys.argv[1]).images
    for shard in range(len(images.paths)):
        for chunk in images.table(shard).column("pixels").chunks:
            pc.sum(chunk.values.values)
    after_read = peak()
    print(json.dumps({"stats": after_stats - before, "read": after_read - after_stats, "totals": stats["totals"]}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
def test_stats_never_reads_pixels(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    pixel_bytes = _synthetic_build(big, rows=12, side=112)  # ~88 MB of pixels
    _synthetic_build(small, rows=2, side=8)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(small)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout)
    assert measured["totals"]["rows"] == 12 and measured["totals"]["image_tokens"] == 12 * 112 * 112 // 4
    # Reading the pixels costs about their size in resident memory; stats costs (almost) nothing.
    assert measured["read"] > 0.8 * pixel_bytes, measured
    assert measured["stats"] < 0.1 * pixel_bytes, measured


def _synthetic_stats(source: str) -> dict:
    totals = {
        "rows": 999,
        "tokens": 184208,
        "trained_tokens": 146830,
        "trained_ratio": 0.797,
        "image_tokens": 0,
        "images": 0,
        "truncated": 0,
        "rejected": 12345,
    }
    storage = {"shards": 1, "bytes": 1000, "bytes_per_row": 1, "pixel_bytes": 0, "pixel_bytes_per_image": 0}
    return {
        "shards_dir": "data/qvl-demo",
        "sources": {source: totals},
        "totals": totals,
        "lengths": {},
        "length_histogram": {"bin_width": 50, "bins": []},
        "images_per_row": [],
        "grids": [],
        "rejected": {"total": 12345, "by_reason": {"image_outside_dataset": 12000, "control_token": 345}},
        "storage": {**storage, "pixel_format": "uint8"},
        "warnings": [],
    }


@pytest.mark.parametrize("source", ["alpaca_en_demo", "a_rather_long_dataset_name_for_80_columns"])
def test_rejection_counts_survive_80_columns(source: str) -> None:
    from rich.console import Console

    from qvl_data.stats import render_stats

    console = Console(width=80, record=True, highlight=False)
    render_stats(_synthetic_stats(source), console)
    lines = [line.split() for line in console.export_text().splitlines()]
    assert all(len(line) <= 80 for line in console.export_text().splitlines())
    assert any(line[:4] == ["image_outside_dataset", "12,000", "an", "image"] for line in lines)
    assert any(line[:2] == ["control_token", "345"] for line in lines)
    assert ["total", "999", "184,208", "146,830", "79.7%", "0", "0", "0", "12,345"] in lines
