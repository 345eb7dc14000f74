"""The partitioned build: the plan, byte identity across executors and worker counts, resuming a killed
build, partition edge cases, and Ray (one processor load per worker, not per task)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset, write_image

from qvl_data.build import build, run_pipeline
from qvl_data.cli import main
from qvl_data.config import BuildConfig
from qvl_data.errors import QvlError
from qvl_data.partition import index_dataset, make_plan, partition_rows, partition_size
from qvl_data.shards import ShardSet

ray = pytest.importorskip("ray")  # a dev dependency: installed by the README's install command


def _sharegpt_rows(images_dir: Path, n: int) -> list[dict]:
    """n rows; images of several sizes; row 8 names a missing image; row 13 repeats row 2's id."""
    rows = []
    for i in range(n):
        row: dict = {"id": f"r{i}", "messages": chat(f"question {i}", f"answer {i}")}
        if i % 3 == 0:
            name = write_image(images_dir / f"img{i}.png", (40 + 37 * i, 30 + 11 * i), seed=i)
            row["messages"] = chat(f"<image>What is in picture {i}?", f"Picture {i}.")
            row["images"] = [f"images/{name}"]
        rows.append(row)
    rows[8]["messages"] = chat("<image>Where is it?", "Nowhere.")
    rows[8]["images"] = ["images/missing.png"]
    rows[13]["id"] = "r2"
    return rows


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three datasets: sharegpt (JSON array, 23 rows), alpaca (JSON Lines with a blank line, 5 rows) and an
    empty one."""
    root = tmp_path_factory.mktemp("scale-out")
    write_dataset(root, "chats", _sharegpt_rows(root / "images", 23))
    write_dataset(root, "empty", [])
    lines = [json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(5)]
    (root / "plain.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    info = json.loads((root / "dataset_info.json").read_text())
    info["plain"] = {"file_name": "plain.jsonl"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _config(dataset_dir: Path, out: Path, **kw) -> BuildConfig:
    options = {"dataset": "chats,empty,plain", "num_proc": 1, "partition_rows": 4, "quiet": True, **kw}
    return BuildConfig(dataset_dir=str(dataset_dir), out=str(out), **options)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every byte a reader sees: manifest, rejected rows, shards and the image store's shards."""
    files = [out / "manifest.json", out / "rejected.jsonl", *sorted((out / "shards").iterdir())]
    files += sorted(p for p in (out / "images").rglob("*") if p.is_file() and "builds" not in p.parts)
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


# ------------------------------------------------------------------------------------------ the plan


def test_partition_size_rule():
    assert partition_size(10, 4) == 4 and partition_size(10, 1) == 1
    assert partition_size(0, 0) == 32 and partition_size(2000, 0) == 32
    assert partition_size(1_000_000, 0) == 977  # at most 1024 partitions per dataset


@pytest.mark.parametrize("size", [1, 4, 5, 23, 100])
def test_partitions_cover_every_row_once_in_order(dataset_dir: Path, tmp_path: Path, size: int):
    index = index_dataset("chats", str(dataset_dir / "chats.json"), size, str(tmp_path))
    plan = make_plan([index])
    assert index.rows == 23 and len(plan) == -(-23 // size)
    assert [p.rows for p in plan] == [min(size, 23 - k) for k in range(0, 23, size)]
    rows = [i for p in plan for i, _ in partition_rows(p)]
    assert rows == list(range(23))
    # the duplicate id is known to the partition of the later row, whatever the cut
    owner = next(p for p in plan if p.first_row <= 13 < p.first_row + p.rows)
    assert (13, 2) in owner.duplicates and sum(len(p.duplicates) for p in plan) == 1


def test_json_lines_index_skips_blank_lines_and_reads_in_place(dataset_dir: Path, tmp_path: Path):
    index = index_dataset("plain", str(dataset_dir / "plain.jsonl"), 2, str(tmp_path))
    plan = make_plan([index])
    assert index.rows == 5 and [p.rows for p in plan] == [2, 2, 1]
    assert all(p.row_file == str(dataset_dir / "plain.jsonl") for p in plan)  # not staged
    assert [row["output"] for p in plan for _, row in partition_rows(p)] == ["0", "1", "2", "3", "4"]
    assert not list(tmp_path.iterdir())


def test_plan_depends_on_inputs_not_on_workers(dataset_dir: Path, tmp_path: Path):
    builds = [run_pipeline(_config(dataset_dir, tmp_path / f"o{n}", num_proc=n)) for n in (1, 2)]
    a, b = (r.manifest.partitions for r in builds)
    assert [(p.source, p.first_row, p.rows) for p in a] == [(p.source, p.first_row, p.rows) for p in b]
    # chats: 6 partitions of 4 rows (the last 3); empty: none; plain: 2
    assert [(p.source, p.rows) for p in a] == [("chats", 4)] * 5 + [
        ("chats", 3),
        ("plain", 4),
        ("plain", 1),
    ]


# ------------------------------------------------------------------------------------------ byte identity


@pytest.fixture(scope="module")
def reference(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    build(_config(dataset_dir, out, num_proc=1))
    return out


def test_every_row_written_or_rejected_with_reason(reference: Path):
    manifest = json.loads((reference / "manifest.json").read_text())
    rejected = [json.loads(line) for line in (reference / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["index"], r["reason"]) for r in rejected] == [
        ("chats", 8, "image_missing"),
        ("chats", 13, "duplicate_id"),
    ]
    assert manifest["input_rows"] == 28 and manifest["totals"]["rows"] == 26
    assert manifest["sources"]["empty"]["rows"] == 0
    assert manifest["totals"]["images"] == 8  # rows 0, 3, ..., 21 (row 8's image is missing)
    assert sum(s["rows"] for s in manifest["shards"]) == 26
    for shard in manifest["shards"]:  # the checksum the task computed while writing is the file's
        data = (reference / shard["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local-2", "ray"])
def test_outputs_byte_identical_across_executors(
    dataset_dir: Path, reference: Path, tmp_path: Path, executor, request: pytest.FixtureRequest
):
    if executor == "ray":
        request.getfixturevalue("ray_executor")  # the module's local Ray (started once): the build joins it
        result = build(_config(dataset_dir, tmp_path, executor="ray", num_proc=2))
        assert ray.is_initialized()  # a Ray the build did not start is left running
    else:
        result = build(_config(dataset_dir, tmp_path, num_proc=2))
    assert _outputs(tmp_path) == _outputs(reference)
    # Every worker had the processor before its first partition: forked from the driver that loaded it,
    # or (Ray) loaded side by side with the others while the datasets were indexed.
    assert result.processor_loads == 0


def test_ray_loads_the_processor_once_per_worker(ray_executor):
    from qvl_data import task

    def load(_: int) -> tuple[int, int]:
        task.processor(None)
        return os.getpid(), task._PROCESSOR["loads"]

    results = list(ray_executor.map_unordered([(load, (k,)) for k in range(12)]))
    pids = {pid for pid, _ in results}
    assert len(pids) < len(results)  # workers ran several tasks each ...
    assert all(loads == 1 for _, loads in results)  # ... and loaded the processor once


@pytest.fixture(scope="module")
def ray_executor():
    from qvl_data.executors import RayExecutor

    executor = RayExecutor(None, 2)
    yield executor
    executor.close()


# ------------------------------------------------------------------------------------------ resuming


@pytest.mark.slow
def test_killed_build_resumes_only_unfinished_partitions(demo_dir: Path, demo_build: Path, tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qvl_data.cli", "build", "--dataset-dir", str(demo_dir), "--out", str(out)]
    cmd += ["--num-proc", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / ".qvl-build" / "parts"
    deadline = time.time() + 120
    while len(list(parts.glob("*.json"))) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.json")))
    assert done >= 8 and not (out / "manifest.json").exists()
    with pytest.raises(QvlError, match="not a complete qvl build"):  # nothing is readable yet
        ShardSet(out)

    rerun = CliRunner().invoke(main, cmd[3:-3] + ["--num-proc", "2"])  # the same command, on a terminal
    assert rerun.exit_code == 0, rerun.output
    reused = int(re.search(r"resumed: reused (\d+) of 36 partitions already built", rerun.output)[1])
    assert done <= reused < 36
    assert not list(out.rglob("*.tmp"))
    assert _outputs(out) == _outputs(demo_build)  # byte-identical to a clean build


def test_changed_image_rebuilds_only_its_partition(dataset_dir: Path, tmp_path: Path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    config = _config(data, tmp_path / "out")
    build(config)
    assert build(config).skipped
    image = data / "images" / "img12.png"
    write_image(image, (100, 60), seed=99)
    os.utime(image, ns=(10**18, 10**18))
    result = build(config)
    assert not result.skipped and result.reused == result.partitions - 1


def test_changed_library_version_rebuilds(dataset_dir: Path, tmp_path: Path, monkeypatch):
    from qvl_data import build as build_module

    config = _config(dataset_dir, tmp_path)
    first = build(config)
    assert first.manifest.versions["pillow"] not in ("", "absent")
    real = build_module.library_versions
    monkeypatch.setattr(build_module, "library_versions", lambda: {**real(), "pillow": "0.0"})
    second = build(config)
    assert not second.skipped and second.reused == 0
    assert second.manifest.fingerprint != first.manifest.fingerprint
