"""Demo data: verified by sha256, cached, and offline on the second call."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from qvl_data import demo
from qvl_data.errors import QvlError
from qvl_data.files import sha256_file


def test_cached_demo_data_is_complete_and_needs_no_network(demo_dir: Path, monkeypatch: pytest.MonkeyPatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("the second call must not run pip")

    monkeypatch.setattr(demo.subprocess, "run", no_pip)
    assert demo.fetch_demo_data() == demo_dir
    for name, digest in demo.DEMO_FILES.items():
        assert sha256_file(demo_dir / name) == digest


def test_a_tampered_sdist_is_refused_and_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / f"llamafactory-{demo.LLAMAFACTORY_VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in demo.DEMO_FILES:
            data = b"[]" if name.endswith(".json") else b"not a jpeg"
            info = tarfile.TarInfo(f"llamafactory-{demo.LLAMAFACTORY_VERSION}/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(QvlError, match="has sha256 .* expected"):
        demo.fetch_demo_data(sdist=sdist)
    assert not demo.demo_data_dir().exists()
