"""The cache and the paths qvl reads under faults: a QVL_CACHE that is a file, damaged cache entries (the
embedded processor, the tiny model, the demo data), FIFOs where files belong, and a hub id without a hub.

Every case ends in a repaired cache entry (qvl's own, so it is rebuilt) or one line naming the path and
what to do; none hangs."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qvl_data import demo, files, hub
from qvl_data import processor as proc
from qvl_data.cli import main
from qvl_data.errors import QvlError
from tests.helpers import chat, write_dataset

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: refused at once, nothing leaves the machine


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread: a regression that blocks on a FIFO fails the test, not the suite."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked on a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


# ------------------------------------------------------------------------------------------ QVL_CACHE


def test_a_qvl_cache_that_is_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("mine")
    monkeypatch.setenv("QVL_CACHE", str(not_a_dir))
    with pytest.raises(QvlError, match="QVL_CACHE is not a directory"):
        files.cache_dir()
    line = _one_line(CliRunner().invoke(main, ["demo-data"]))
    assert str(not_a_dir) in line and "QVL_CACHE" in line
    assert not_a_dir.read_text() == "mine"  # never touched


def test_a_qvl_cache_below_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "file").write_text("mine")
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(QvlError, match="cannot create QVL_CACHE .*writable directory"):
        files.cache_dir()


# ------------------------------------------------------------------------------ the embedded processor


@pytest.fixture(scope="module")
def built_processor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded processor, built once for this module in a cache of its own."""
    cache = tmp_path_factory.mktemp("built-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_CACHE", str(cache))
        proc.embedded_processor_dir()
    return cache / "processor"


@pytest.fixture()
def fresh_cache(built_processor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, holding a copy of a complete embedded processor build."""
    cache = tmp_path / "qvl-cache"
    shutil.copytree(built_processor, cache / "processor")
    monkeypatch.setenv("QVL_CACHE", str(cache))
    return cache


def test_a_truncated_cached_tokenizer_is_rebuilt(fresh_cache: Path):
    built = proc.embedded_processor_dir()
    good = (built / "tokenizer.json").read_bytes()
    with open(built / "tokenizer.json", "r+b") as f:
        f.truncate(len(good) // 2)  # a disk that filled up, a copy that was cut short
    assert proc.embedded_processor_dir() == built
    assert (built / "tokenizer.json").read_bytes() == good
    assert proc.load_tokenizer(None).encode("Hello world") == [9707, 1879]


def test_a_same_size_damaged_cached_tokenizer_is_rebuilt_when_it_fails_to_load(fresh_cache: Path):
    built = proc.embedded_processor_dir()
    good = (built / "tokenizer_config.json").read_bytes()
    (built / "tokenizer_config.json").write_bytes(b"{" * len(good))  # same size: only its sha256 tells
    assert proc.load_tokenizer(None).encode("Hello world") == [9707, 1879]
    assert (built / "tokenizer_config.json").read_bytes() == good


def test_a_fifo_or_a_damaged_marker_in_the_processor_cache_is_rebuilt(fresh_cache: Path):
    built = proc.embedded_processor_dir()
    good = (built / "preprocessor_config.json").read_bytes()
    _fifo(built / "preprocessor_config.json")
    _within(60, lambda: proc.load_image_processor(None))
    assert (built / "preprocessor_config.json").read_bytes() == good
    (built / files.BUILD_MARKER).write_text("null")
    assert proc.embedded_processor_dir() == built
    assert files.read_marker(built)["files"]["preprocessor_config.json"]["bytes"] == len(good)


def test_an_embedded_processor_that_still_fails_names_its_cache_directory(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    built = proc.embedded_processor_dir()

    def broken(*args, **kwargs):
        raise ValueError("this transformers cannot read it\nsecond line")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(QvlError) as raised:
        proc.load_tokenizer(None)
    message = str(raised.value)
    assert "\n" not in message and str(built) in message and f"rm -r {built}" in message
    assert "this transformers cannot read it" in message


# ---------------------------------------------------------------------------------------- tiny model


def test_a_truncated_cached_tiny_model_is_rebuilt_bit_for_bit(fresh_cache: Path):
    from qvl_train.model import tiny_model_dir

    out = tiny_model_dir()
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "r+b") as f:
        f.truncate(1000)
    assert tiny_model_dir() == out
    assert weights.read_bytes() == good  # seeded: the rebuild is the same model


def test_a_tiny_model_from_before_markers_is_rebuilt_when_its_weights_fail_to_load(fresh_cache: Path):
    import torch

    from qvl_train.model import load_base, tiny_model_dir

    out = tiny_model_dir()
    good = (out / "model.safetensors").read_bytes()
    (out / files.BUILD_MARKER).unlink()  # a cache entry written by an earlier qvl
    (out / "model.safetensors").write_bytes(b"\0" * len(good))
    model = load_base("tiny", torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "model.safetensors").read_bytes() == good


# ----------------------------------------------------------------------------------------- demo data


def _demo_sdist(source: Path, dest: Path) -> Path:
    """An sdist holding the real demo files (as pip would fetch it), built from a verified copy."""
    sdist = dest / f"llamafactory-{demo.LLAMAFACTORY_VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in demo.DEMO_FILES:
            data = (source / name).read_bytes()
            info = tarfile.TarInfo(f"llamafactory-{demo.LLAMAFACTORY_VERSION}/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sdist


@pytest.fixture()
def cached_demo(demo_dir: Path, fresh_cache: Path) -> Path:
    """A copy of the verified demo data in a fresh cache (the session's own copy stays untouched)."""
    target = demo.demo_data_dir()
    shutil.copytree(demo_dir, target)
    assert demo.fetch_demo_data() == target
    return target


def test_damaged_demo_data_is_fetched_again(
    cached_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    sdist = _demo_sdist(cached_demo, tmp_path)
    good = (cached_demo / "mllm_demo.json").read_bytes()
    (cached_demo / "mllm_demo.json").write_bytes(good[:100])
    monkeypatch.setattr(demo, "_download_sdist", lambda dest: sdist)
    assert demo.fetch_demo_data() == cached_demo
    assert (cached_demo / "mllm_demo.json").read_bytes() == good


def test_damaged_demo_data_without_network_is_one_line_naming_the_cache(
    cached_demo: Path, monkeypatch: pytest.MonkeyPatch
):
    (cached_demo / "mllm_demo_data" / "2.jpg").write_bytes(b"not a jpeg")

    def offline(dest: Path) -> Path:
        raise QvlError("could not download llamafactory==0.9.5 with pip: no network")

    monkeypatch.setattr(demo, "_download_sdist", offline)
    line = _one_line(CliRunner().invoke(main, ["demo-data"]))
    assert str(cached_demo) in line and "mllm_demo_data/2.jpg" in line and f"delete {cached_demo}" in line


# --------------------------------------------------------------------------------- non-regular files


def test_sha256_of_a_fifo_is_refused_not_read(tmp_path: Path):
    fifo = _fifo(tmp_path / "pipe")
    with pytest.raises(QvlError, match="not a regular file"):
        _within(10, lambda: files.sha256_file(fifo))


def test_a_model_directory_with_a_fifo_is_one_line(tmp_path: Path):
    from qvl_train.model import model_config

    model = tmp_path / "model"
    shutil.copytree(proc.embedded_processor_dir(), model)
    _fifo(model / "tokenizer_config.json")
    for load in (
        lambda: proc.check_model_source(str(model)),
        lambda: proc.load_tokenizer(str(model)),
        lambda: proc.processor_files_digest(str(model)),
    ):
        with pytest.raises(QvlError, match="tokenizer_config.json: not a regular file"):
            _within(30, load)
    _fifo(model / "config.json")
    with pytest.raises(QvlError, match="not a regular file"):
        _within(30, lambda: model_config(str(model)))


def test_a_fifo_as_the_model_config_or_in_an_adapter_is_one_line(tmp_path: Path):
    from qvl_train.model import load_for_inference, model_config

    with pytest.raises(QvlError, match="model config is a FIFO, not a regular file"):
        _within(30, lambda: model_config(str(_fifo(tmp_path / "config.json"))))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    _fifo(adapter / "adapter_model.safetensors")
    with pytest.raises(QvlError, match="adapter_model.safetensors: not a regular file"):
        _within(60, lambda: load_for_inference("tiny", str(adapter)))


def test_a_fifo_as_the_demo_sdist_is_refused(fresh_cache: Path, tmp_path: Path):
    fifo = _fifo(tmp_path / f"llamafactory-{demo.LLAMAFACTORY_VERSION}.tar.gz")
    with pytest.raises(QvlError, match="not a regular file"):
        _within(10, lambda: demo.fetch_demo_data(sdist=fifo))


# --------------------------------------------------------------------------------------- hub, offline


@pytest.fixture()
def no_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    for name in (*hub._PROXY_VARIABLES, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_HUB)
    return UNREACHABLE_HUB


def test_a_hub_id_without_a_hub_is_one_line_in_seconds(no_hub: str, tmp_path: Path):
    data = write_dataset(tmp_path / "data", "tiny", [{"messages": chat("hi", "hello")}])
    args = ["build", "--dataset-dir", str(data), "--dataset", "tiny", "--out", str(tmp_path / "out")]
    started = time.perf_counter()
    line = _one_line(CliRunner().invoke(main, [*args, "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--quiet"]))
    assert time.perf_counter() - started < 30  # the hub client's retries take ~50 s per file
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in line and no_hub in line and "HF_HUB_OFFLINE=1" in line


def test_a_cached_hub_model_without_a_hub_switches_the_client_offline(
    no_hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(QvlError, match="cannot be reached"):
        hub.require_hub("qvl-test/cached")
    (tmp_path / "hub" / "models--qvl-test--cached" / "snapshots" / "0123abcd").mkdir(parents=True)
    hub.require_hub("qvl-test/cached")  # the cached copy is used, without the client's retries
    assert constants.HF_HUB_OFFLINE is True


def test_the_trainer_refuses_a_hub_id_without_a_hub_in_one_line(no_hub: str):
    from qvl_train.model import model_config

    with pytest.raises(QvlError) as raised:
        _within(30, lambda: model_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    assert "\n" not in str(raised.value) and no_hub in str(raised.value)


def test_offline_mode_is_left_to_the_hub_client_which_fails_fast(no_hub: str, tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # an empty HF cache
    hub_env = {k: v for k, v in env.items() if k not in hub._PROXY_VARIABLES}
    # A child process: the hub client reads HF_HUB_OFFLINE when it is imported.
    code = "from qvl_data.cli import main; main(['build', '--model', 'qvl-test/not-cached', '--quiet'])"
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", code], env=hub_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert time.perf_counter() - started < 60
    assert child.returncode == 2, child.stderr
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model qvl-test/not-cached" in lines[0], child.stderr
