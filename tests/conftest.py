"""Shared fixtures: the demo data (fetched once through pip, cached) and one demo build per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qvl_data.cli import main


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from qvl_data.demo import fetch_demo_data

    return fetch_demo_data()


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """What a bare `qvl-data build` writes (./data/qvl-demo: the three demo sets, default options).

    Treat as read-only: many tests share it.
    """
    cwd = tmp_path_factory.mktemp("bare-build")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, ["build", "--quiet"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    return cwd / "data" / "qvl-demo"


@pytest.fixture(scope="session")
def tokenizer():
    from qvl_data.processor import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def image_processor():
    from qvl_data.processor import load_image_processor

    return load_image_processor(None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the tiny model's matmuls are too small to share, and on a busy 2-core machine
    OpenMP's spinning threads make each step 10-50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def qwen3_build(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The mllm_demo and identity demo sets built with the offline Qwen3-VL processor (16-px patches).

    Treat as read-only: the Qwen3-VL training and inference tests share it.
    """
    out = tmp_path_factory.mktemp("qwen3-build") / "shards"
    args = ["build", "--dataset-dir", str(demo_dir), "--dataset", "mllm_demo,identity", "--model", "qwen3-vl"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--num-proc", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out
