"""The three LLaMA-Factory demo datasets, fetched once through pip and verified by sha256.

They ship in the ``data/`` folder of the ``llamafactory`` source distribution on PyPI. We download that
sdist with pip (no hub, no git), extract only the files we need, check every one against the digests
below and cache them under ``$QVL_CACHE/demo/llamafactory-<version>/data``. A second call finds the
cache complete and returns at once, offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qvl_data.errors import QvlError
from qvl_data.files import cache_dir, publish_directory, regular_file, sha256_file, staging_directory

LLAMAFACTORY_VERSION = "0.9.5"
DEMO_DATASETS = ("mllm_demo", "identity", "alpaca_en_demo")

# sha256 of every file we take from llamafactory-0.9.5.tar.gz (paths relative to its data/ folder).
DEMO_FILES: dict[str, str] = {
    "dataset_info.json": "17162e129cbfede1ef7e955dbb7819146b78cd8809fa4f39dff4f9e61308c50f",
    "mllm_demo.json": "0732db8e2351bc22233268e2956bed1f66c75343c27bdc08b80b2a47e12c7f24",
    "identity.json": "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
    "alpaca_en_demo.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    "mllm_demo_data/1.jpg": "95d292cbe8e7151b277f8c04f670a1bd28bbb36882ed5ac0a486b6e5f6e67a0b",
    "mllm_demo_data/2.jpg": "0e64ce34dc2bf99fb5083859c57bcee674b8bfece62e7d8425a87f986b3c074f",
    "mllm_demo_data/3.jpg": "e4b1c7c2626bfe475c20fb8163d3644186e10db9530877ff72c0230f31f90aaf",
}


def demo_data_dir() -> Path:
    """Where the verified demo files live once fetched."""
    return cache_dir() / "demo" / f"llamafactory-{LLAMAFACTORY_VERSION}" / "data"


def _damaged_files(data_dir: Path) -> list[str]:
    """The demo files that are missing, not regular files, or not of their digest: ~1 ms for all seven,
    so every use checks them and a damaged cache is never read."""
    damaged = []
    for name, expected in DEMO_FILES.items():
        try:
            if sha256_file(data_dir / name) != expected:
                damaged.append(name)
        except QvlError:
            damaged.append(name)
    return damaged


def _cache_is_complete(data_dir: Path) -> bool:
    # The marker, written after verification, tells a half-extracted directory from a complete one.
    return (data_dir / ".verified").is_file() and not _damaged_files(data_dir)


def _download_sdist(dest: Path) -> Path:
    """Download the llamafactory sdist with pip; return the path of the .tar.gz."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest)]
    spec = f"llamafactory=={LLAMAFACTORY_VERSION}"
    # pip prepares the sdist's metadata; with hatchling installed (our dev extra) that needs no isolated
    # build environment, which saves a minute of installing build tools.
    attempts = [base + ["--no-build-isolation", spec], base + [spec]]
    try:
        import hatchling  # noqa: F401
    except ImportError:
        attempts = attempts[1:]
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(dest.glob(f"llamafactory-{LLAMAFACTORY_VERSION}.tar.gz"))
        if proc.returncode == 0 and found:
            return found[0]
        errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])
    raise QvlError(f"could not download llamafactory=={LLAMAFACTORY_VERSION} with pip: {errors[-1][0]}")


def _extract_and_verify(sdist: Path, out_dir: Path) -> None:
    prefix = f"llamafactory-{LLAMAFACTORY_VERSION}/data/"
    with tarfile.open(sdist, "r:gz") as tar:
        for name in DEMO_FILES:
            member = tar.getmember(prefix + name)
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise QvlError(f"{sdist.name}: {prefix + name} is not a regular file")
            with src, open(target, "wb") as f:
                shutil.copyfileobj(src, f)
    for name, expected in DEMO_FILES.items():
        actual = sha256_file(out_dir / name)
        if actual != expected:
            raise QvlError(f"{sdist.name}: {name} has sha256 {actual}, expected {expected}")


def fetch_demo_data(sdist: Path | None = None) -> Path:
    """Return the verified demo data directory, downloading the sdist with pip on first use.

    ``sdist`` lets a caller (or a test) supply an already downloaded ``llamafactory-0.9.5.tar.gz``. A
    cached copy with a damaged file (truncated, edited) is fetched again and replaced: it is qvl's own.
    """
    data_dir = demo_data_dir()
    if _cache_is_complete(data_dir):
        return data_dir
    damaged = _damaged_files(data_dir) if data_dir.exists() else []
    with tempfile.TemporaryDirectory(prefix="qvl-demo-") as tmp:
        if sdist is None:
            try:
                sdist = _download_sdist(Path(tmp))
            except QvlError as e:
                if not damaged:
                    raise
                raise QvlError(
                    f"{data_dir}: the cached demo data is damaged ({', '.join(damaged)}) and {e}; "
                    f"delete {data_dir} and run `qvl-data demo-data` where pip can reach PyPI"
                ) from None
        else:
            regular_file(Path(sdist), "sdist")
        staging = staging_directory(data_dir)
        try:
            _extract_and_verify(Path(sdist), staging)
            (staging / ".verified").write_text(f"llamafactory=={LLAMAFACTORY_VERSION}\n")
            publish_directory(staging, data_dir, _cache_is_complete)  # atomic: complete or absent
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only when another process published first
    return data_dir
