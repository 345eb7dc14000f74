"""Shard format: readable without qvl (datasets, polars), pixels reconstruct exactly, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import chat, write_dataset, write_image

from qvl_data import shards
from qvl_data.build import build
from qvl_data.config import BuildConfig
from qvl_data.errors import QvlError
from qvl_data.shards import ShardSet
from qvl_data.vision import open_image, preresize_image

MODES = {"RGB": "jpg", "RGBA": "png", "L": "png", "P": "png", "CMYK": "tiff"}
SIZES = {"tiny": (13, 9), "huge": (1200, 900)}  # < 28 px a side; > image_max_pixels (262144)


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("images")
    rows = []
    for seed, (mode, ext) in enumerate(MODES.items()):
        for size_name, size in SIZES.items():
            name = write_image(data / f"{mode}_{size_name}.{ext}", size, mode, seed=seed)
            rows.append({"messages": chat(f"<image>{mode} {size_name}?", "yes"), "images": [name]})
    return write_dataset(data, "modes", rows)


@pytest.mark.parametrize("pixel_format", ["uint8", "float32", "webp"])
def test_reconstructed_pixels_equal_the_processor_output(
    image_dataset, tmp_path, image_processor, pixel_format
):
    config = BuildConfig(
        dataset_dir=str(image_dataset), dataset="modes", out=str(tmp_path), num_proc=1, quiet=True
    )
    config.pixel_format = pixel_format
    build(config)
    rows = ShardSet(tmp_path)
    assert len(rows) == len(MODES) * len(SIZES)
    for i in range(len(rows)):
        row = rows.row(i)
        image = preresize_image(
            open_image(row["images"][0])
        )  # the reference's pre-resize, then HF's processor
        expected = image_processor(images=[image], return_tensors="np")
        got = rows.pixel_values(i)
        assert got.dtype == np.float32 and got.shape == expected["pixel_values"].shape, row["images"][0]
        assert np.abs(got - expected["pixel_values"]).max() <= 1e-5, row["images"][0]
        assert row["image_grid_thw"] == expected["image_grid_thw"].tolist()
        assert np.array_equal(rows.read_pixel_patches(i), rows.pixel_patches(i))  # pread == mapped
    bytes_per_patch = rows.pixel_patches(0).nbytes // rows.pixel_patches(0).shape[0]
    assert bytes_per_patch == {"uint8": 588, "float32": 4704, "webp": 588}[pixel_format]
    stored = sum(s.pixel_bytes for s in rows.manifest.image_store.shards)
    patches = sum(len(rows.pixel_patches(i)) for i in range(len(rows)))
    if pixel_format == "webp":  # compressed: less than the raw uint8 patches
        assert 0 < stored < patches * 588
    else:
        assert stored == patches * bytes_per_patch


def test_shards_open_with_datasets_and_polars(demo_build: Path):
    import datasets
    import polars as pl

    manifest = shards.load_manifest(demo_build)
    total = 0
    for shard in manifest.shards:
        path = demo_build / shard.file
        ds = datasets.Dataset.from_file(str(path))
        df = pl.read_ipc_stream(path)
        assert len(ds) == df.height == shard.rows
        assert int(df["length"].sum()) == shard.tokens
        assert sum(ds["trained_tokens"]) == shard.trained_tokens
        first = ds[0]
        assert first["length"] == len(first["input_ids"]) == len(first["labels"])
        total += len(ds)
    assert total == 1096
    row0 = datasets.Dataset.from_file(str(demo_build / manifest.shards[0].file))[0]
    assert row0["image_grid_thw"] == [[1, 12, 22], [1, 12, 22]] and len(row0["image_keys"]) == 2
    # a row's pixels: its images' entries in the image store, found by key (the README's recipe)
    store = demo_build / manifest.image_store.path / manifest.image_store.config_id
    images = pl.concat([pl.read_ipc_stream(store / s.file) for s in manifest.image_store.shards])
    patches = [images.filter(pl.col("key") == key)["pixels"][0] for key in row0["image_keys"]]
    assert [len(p) for p in patches] == [264, 264] and len(patches[0][0]) == 588


def test_reader_rejects_missing_and_foreign_directories(tmp_path: Path, demo_build: Path):
    with pytest.raises(QvlError, match="no such shard directory"):
        ShardSet(tmp_path / "nope")
    with pytest.raises(QvlError, match="not a complete qvl build"):
        ShardSet(tmp_path)
    manifest = json.loads((demo_build / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QvlError, match="shard format version 99 but this qvl reads version 3"):
        ShardSet(tmp_path)


def test_find_and_row_lookup(demo_build: Path):
    rows = ShardSet(demo_build)
    i = rows.find("identity", 5)
    assert rows.row(i)["index"] == 5 and rows.row(i)["source"] == "identity"
    with pytest.raises(KeyError):
        rows.find("identity", 10_000)
