"""Shared fixtures: the demo data (fetched once through pip, cached) and one demo build per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl_data.build import build
from qvl_data.config import BuildConfig


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from qvl_data.demo import fetch_demo_data

    return fetch_demo_data()


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The three demo datasets built with default options (uint8 pixels, 2 workers). Treat as read-only."""
    out = tmp_path_factory.mktemp("qvl-demo")
    build(BuildConfig(dataset_dir=str(demo_dir), out=str(out), num_proc=2, quiet=True))
    return out


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
