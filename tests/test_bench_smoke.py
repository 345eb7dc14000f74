"""The benchmarks' smoke modes: every script runs end to end on tiny data and writes its JSON.

Speed is not asserted (that is what the benchmarks themselves are for, on a quiet machine); these tests
only keep the scripts working. All four run in this process (``--smoke`` implies ``--in-process``), so
the heavy imports are paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import build as bench_build
from bench import common, gpu_step, loader, train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-data")


def _run(module, tmp_path: Path, data_dir: Path | None, *extra: str) -> dict:
    out = tmp_path / f"{module.NAME}.json"
    argv = ["--smoke", "--out", str(out), *extra]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    module.main(argv)
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == module.NAME
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["date"]
    assert payload["results"], "no configuration ran"
    return payload


@pytest.mark.slow
def test_build_smoke(tmp_path: Path, data_dir: Path):
    payload = _run(bench_build, tmp_path, data_dir)
    methods = {(r["method"], r["num_proc"], r["pixel_format"]) for r in payload["results"]}
    assert {
        ("qvl", 1, "uint8"),
        ("qvl", 2, "uint8"),
        ("qvl", 2, "webp"),
        ("datasets.map", 1, "float32"),
    } <= methods
    for r in payload["results"]:
        assert r["rows"] > 0 and r["rows_per_s"] > 0 and r["process"]["peak_rss_bytes"] > 0
    qvl = next(r for r in payload["results"] if r["method"] == "qvl")
    base = next(r for r in payload["results"] if r["method"] == "datasets.map")
    assert qvl["tokens"] == base["tokens"]  # the baseline does the same work
    size = payload["sizes"][0]
    assert size["uint8_pixel_bytes_per_image"] * 8 == pytest.approx(size["float32_pixel_bytes_per_image"])
    assert 0 < size["webp_pixel_bytes_per_image"] < size["uint8_pixel_bytes_per_image"]


def test_loader_smoke(tmp_path: Path, data_dir: Path):
    payload = _run(loader, tmp_path, data_dir)
    sources = {r["source"] for r in payload["results"]}
    assert sources == {"qvl uint8", "qvl webp", "qvl float32", "on the fly"}
    throughput = [r for r in payload["results"] if r["kind"] == "throughput"]
    assert len({r["first_batch_digest"] for r in throughput}) == 1  # identical tensors from every source
    assert all(r["batches_per_s"] > 0 for r in throughput)


def test_train_step_smoke(tmp_path: Path, data_dir: Path):
    payload = _run(train_step, tmp_path, data_dir)
    loops = {(r["loop"], r["data_path"]) for r in payload["results"]}
    assert ("qvl", "qvl shards") in loops and ("HF Trainer", "on the fly") in loops
    for r in payload["results"]:
        assert r["s_per_step"] > 0 and r["trained_tokens_per_s"] > 0


def test_gpu_step_smoke(tmp_path: Path):
    payload = _run(gpu_step, tmp_path, None)
    assert {r["loop"] for r in payload["results"]} == {"qvl", "HF Trainer"}
    assert payload["flops_per_micro_batch"]["total"] > 0
    assert "4 * N_frozen_linear" in payload["flops_formula"]


def test_tree_pids_sees_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in common.tree_pids(os.getpid())
        assert common.process_memory(child.pid)["VmRSS"] > 0
    finally:
        child.kill()
        child.wait()
