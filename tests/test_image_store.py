"""The image store: each distinct image processed once, rows equal to a per-row build's, text-side
rebuilds reuse every image, a changed image redoes only it, resuming is byte-identical, a shared store
and its garbage collection, integrity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset, write_image

from qvl_data import image_store
from qvl_data.build import build
from qvl_data.cli import main
from qvl_data.config import BuildConfig
from qvl_data.encode import encode_record
from qvl_data.schema import rejection_line
from qvl_data.shards import DamagedShard, ShardSet
from qvl_data.sources import convert_partition
from qvl_data.verify import verify_build


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VQA-style rows (several questions per image), one image under two paths, one image whose header
    reads but whose data does not decode (alone, and before a good image in a two-image row)."""
    root = tmp_path_factory.mktemp("store")
    images = root / "images"
    for k, size in enumerate([(60, 40), (300, 200), (20, 90)]):
        write_image(images / f"img{k}.png", size, seed=k)
    shutil.copy(images / "img0.png", images / "copy_of_img0.png")
    write_image(images / "broken.jpg", (64, 64), seed=7)
    data = (images / "broken.jpg").read_bytes()
    (images / "broken.jpg").write_bytes(data[: len(data) // 2])  # header intact, data cut
    rows = []
    for q in range(4):
        for k in range(3):
            rows.append(
                {
                    "messages": chat(f"<image>question {q} on {k}?", f"answer {q}"),
                    "images": [f"images/img{k}.png"],
                }
            )
    rows.append({"messages": chat("<image>the copy?", "same"), "images": ["images/copy_of_img0.png"]})
    rows.append({"messages": chat("<image>broken?", "no"), "images": ["images/broken.jpg"]})
    two = {"messages": chat("<image><image>both?", "no"), "images": ["images/broken.jpg", "images/img1.png"]}
    rows.append(two)
    rows.append({"messages": chat("no image", "fine")})
    return write_dataset(root, "vqa", rows)


def _config(dataset_dir: Path, out: Path, **kw) -> BuildConfig:
    options = {"dataset": "vqa", "num_proc": 1, "partition_rows": 4, "quiet": True, **kw}
    return BuildConfig(dataset_dir=str(dataset_dir), out=str(out), **options)


def _store_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and image_store.BUILDS_DIR not in p.relative_to(store).parts
    }


def _outputs(out: Path) -> dict[str, bytes]:
    files = [out / "manifest.json", out / "rejected.jsonl", *sorted((out / "shards").iterdir())]
    found = {str(p.relative_to(out)): p.read_bytes() for p in files}
    return {**found, **{f"images/{k}": v for k, v in _store_files(out / "images").items()}}


@pytest.mark.parametrize("pixel_format", ["uint8", "float32", "webp"])
def test_rows_and_pixels_equal_a_per_row_encoding(
    dataset_dir, tmp_path, tokenizer, image_processor, pixel_format
):
    config = _config(dataset_dir, tmp_path / "out", pixel_format=pixel_format)
    build(config)
    rows = ShardSet(tmp_path / "out")
    from qvl_data.build import encode_options, read_options
    from qvl_data.partition import index_dataset, make_plan
    from qvl_data.sources import resolve_datasets

    spec = resolve_datasets(dataset_dir, ["vqa"])[0]
    plan = make_plan([index_dataset("vqa", str(spec.path), 4, str(tmp_path))])
    options = encode_options(config)
    expected_rows, expected_rejections = [], []
    for partition in plan:
        for item in convert_partition(spec, partition, read_options(config, dataset_dir)):
            encoded = encode_record(item, tokenizer, image_processor, options, file=partition.file)
            (expected_rows if hasattr(encoded, "input_ids") else expected_rejections).append(encoded)
    assert len(rows) == len(expected_rows) == 14
    for i, want in enumerate(expected_rows):
        got = rows.row(i)
        assert (got["input_ids"], got["labels"]) == (want.input_ids, want.labels)
        assert got["image_grid_thw"] == [list(g) for g in want.image_grid_thw]
        assert got["image_sizes"] == [list(s) for s in want.image_sizes]
        stored = rows.read(i, "pixels")
        if pixel_format == "webp":
            assert stored.tobytes() == b"".join(want.pixels or [])
        elif want.pixels is not None:
            assert stored.dtype == want.pixels.dtype and np.array_equal(stored, want.pixels.reshape(-1))
            assert np.array_equal(rows.pixel_patches(i), want.pixels)
    # the two rows whose image cannot be decoded: rejected as a per-row build rejects them
    rejected = (tmp_path / "out" / "rejected.jsonl").read_text(encoding="utf-8")
    assert rejected == "".join(rejection_line(r) for r in expected_rejections)
    assert [r.reason for r in expected_rejections] == ["image_unreadable", "image_unreadable"]


def test_one_entry_per_distinct_image_and_text_rebuild_reuses_every_pixel(dataset_dir, tmp_path):
    out = tmp_path / "out"
    first = build(_config(dataset_dir, out))
    # img0 (also under a second path), img1, img2, broken: 4 distinct images for 16 image uses
    assert first.images == 4 and first.images_reused == 0
    assert sum(s.entries for s in first.manifest.image_store.shards) == 4
    before = _store_files(out / "images")
    second = build(_config(dataset_dir, out, cutoff_len=1024))  # the text side only
    assert not second.skipped and second.reused == 0  # every partition re-tokenized ...
    assert second.images == second.images_reused == 4  # ... and every image reused
    assert _store_files(out / "images") == before  # nothing written to the store


def test_changed_image_redoes_only_its_entry_and_rows(dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    config = _config(data, tmp_path / "out")
    build(config)
    write_image(data / "images" / "img2.png", (80, 50), seed=42)
    result = build(config)
    assert result.images - result.images_reused == 1  # only the new content is processed
    # img2 is in partitions 0, 1 and 2 (every third row of the first 12): the 2 others are reused
    assert result.reused == result.partitions - 3


def test_interrupted_phases_resume_byte_identical(dataset_dir, tmp_path):
    reference = tmp_path / "reference"
    build(_config(dataset_dir, reference))
    out = tmp_path / "out"
    build(_config(dataset_dir, out))
    # the state of a build killed during its image phase: rows done, one bucket published, no manifest
    (out / "manifest.json").unlink()
    folder = next(p for p in (out / "images").iterdir() if (p / "config.json").is_file())
    bucket = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    shard = next(bucket.glob("*.arrow"))
    shard.rename(bucket / f".{shard.name}.tmp-123")  # half-written, never published
    # ... and one partition of its row phase unfinished
    (out / ".qvl-build" / "parts" / "00001.json").unlink()
    result = build(_config(dataset_dir, out))
    assert result.reused == result.partitions - 1 and result.images - result.images_reused >= 1
    (bucket / f".{shard.name}.tmp-123").unlink()
    assert _outputs(out) == _outputs(reference)


def test_shared_store_keeps_one_copy_and_gc_removes_what_no_build_uses(dataset_dir, tmp_path):
    store = tmp_path / "store"
    a = build(_config(dataset_dir, tmp_path / "a", image_store=str(store)))
    b = build(_config(dataset_dir, tmp_path / "b", image_store=str(store), cutoff_len=1024))
    assert b.images_reused == b.images == a.images
    assert not (tmp_path / "a" / "images").exists()
    assert ShardSet(tmp_path / "b").pixel_patches(0).shape[0] > 0
    c = build(_config(dataset_dir, tmp_path / "c", image_store=str(store), image_max_pixels=4096))
    assert c.images_reused == 0  # another pixel configuration: its own folder
    assert image_store.gc_images(store).removed == []  # every shard is some build's
    shutil.rmtree(tmp_path / "c")
    dry = image_store.gc_images(store, dry_run=True)
    assert dry.removed and all(Path(p).exists() for p in dry.removed)
    report = image_store.gc_images(store)
    assert report.removed == dry.removed and report.bytes_freed > 0
    assert not any(Path(p).exists() for p in report.removed)
    assert verify_build(tmp_path / "a").damaged == [] and verify_build(tmp_path / "b").damaged == []
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    notes = next(p for p in store.iterdir() if (p / "config.json").is_file()) / "00" / "notes.txt"
    notes.parent.mkdir(exist_ok=True)
    notes.write_text("mine")
    image_store.gc_images(store)  # no build left: every image shard goes, but never a file qvl did not name
    assert notes.read_text() == "mine" and not list(notes.parent.parent.rglob("*.arrow"))


def test_verify_finds_a_flipped_byte_in_an_image_shard(dataset_dir, tmp_path):
    out = tmp_path / "out"
    manifest = build(_config(dataset_dir, out)).manifest
    info = manifest.image_store
    path = out / info.path / info.config_id / info.shards[0].file
    assert verify_build(out).damaged == []
    stats = CliRunner().invoke(main, ["stats", str(out), "--verify", "--json"])
    assert (
        stats.exit_code == 0 and "totals" in json.loads(stats.stdout) and "match the manifest" in stats.stderr
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the pixels, most of the file
    path.write_bytes(bytes(data))
    damaged = verify_build(out).damaged
    assert len(damaged) == 1 and "image shard" in damaged[0] and str(path) in damaged[0]
    stats = CliRunner().invoke(main, ["stats", str(out), "--verify", "--no-color"])
    assert stats.exit_code == 1 and str(path) in stats.output and "repair:" in stats.output
    rows = ShardSet(out, check_images=True)  # the reader's own check, per image it reads
    with pytest.raises(DamagedShard, match="differ from their sha256"):
        for i in range(len(rows)):
            rows.read_pixel_patches(i)
    for i in range(len(ShardSet(out))):  # without it, nothing notices
        ShardSet(out).read(i, "pixels")
    from qvl_train.data import ShardDataset  # the trainer's loader: --verify-images

    loader = ShardDataset(out, verify_images=True)
    with pytest.raises(DamagedShard, match="differ from their sha256"):
        for i in range(len(loader)):
            loader[i]
    assert all(ShardDataset(out)[i]["row"] == i for i in range(len(loader)))
    path.unlink()  # the repair verify names: the re-run makes that image shard again
    result = build(_config(dataset_dir, out))
    assert not result.skipped and result.reused == result.partitions
    assert verify_build(out).damaged == []


def test_manifest_names_the_store_relative_to_a_moved_build(dataset_dir, tmp_path):
    build(_config(dataset_dir, tmp_path / "out"))
    shutil.move(tmp_path / "out", tmp_path / "moved")
    rows = ShardSet(tmp_path / "moved")
    assert rows.manifest.image_store.path == "images"
    assert rows.read_pixel_patches(0).shape[0] > 0
    assert image_store.gc_images(tmp_path / "moved" / "images").removed == []  # still registered


@pytest.mark.slow
def test_build_killed_in_its_image_phase_resumes_byte_identical(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    rows = []
    for k in range(48):  # distinct images: about one image task (bucket) each
        name = write_image(data / "images" / f"p{k}.png", (700, 500), seed=100 + k)
        rows.append({"messages": chat(f"<image>photo {k}?", "yes"), "images": [f"images/{name}"]})
    write_dataset(data, "vqa", rows)
    reference = tmp_path / "reference"
    build(_config(data, reference))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qvl_data.cli", "build", "--dataset-dir", str(data), "--dataset", "vqa"]
    cmd += ["--out", str(out), "--num-proc", "1", "--partition-rows", "4", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for _ in (out / "images").glob("?" * 16 + "/??/*.arrow")) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    published = sum(1 for _ in (out / "images").glob("?" * 16 + "/??/*.arrow"))
    result = build(_config(data, out))
    assert result.reused == result.partitions  # the row phase had finished
    assert published <= result.images_reused < result.images
    assert _outputs(out) == _outputs(reference)
