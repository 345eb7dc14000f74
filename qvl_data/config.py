"""Build configuration: one dataclass, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qvl_data.errors import QvlError
from qvl_data.shards import PIXEL_FORMATS

DEMO_DATASETS = "mllm_demo,identity,alpaca_en_demo"

T = TypeVar("T")


@dataclass
class BuildConfig:
    dataset_dir: str | None = None
    """Folder holding dataset_info.json and the data files; default: the cached LLaMA-Factory demo data."""
    dataset: str = DEMO_DATASETS
    """Comma-separated dataset names from dataset_info.json, built in this order."""
    model: str | None = None
    """Local checkpoint dir or hub id whose tokenizer + image processor to use; default: the embedded one."""
    out: str = "data/qvl-demo"
    """Output directory (manifest.json, rejected.jsonl, shards/)."""
    num_proc: int = 0
    """Worker processes; 0 means one per CPU."""
    cutoff_len: int = 2048
    """Maximum tokens per row, truncated as LLaMA-Factory does (image spans are never cut)."""
    image_max_pixels: int = 262144
    """Pre-resize images above this many pixels (LLaMA-Factory's image_max_pixels)."""
    image_min_pixels: int = 1024
    """Pre-resize images below this many pixels up to it."""
    mask_history: bool = False
    """Train only on the last answer of each conversation (and truncate last turn first)."""
    pixel_format: str = "uint8"
    """uint8: patches before rescale/normalize (1/8 of float32); webp: those patches as one lossless WebP
    per image (~1/20 of float32 on photos; ~7 ms per 512x512 image to decode in the loader); float32: the
    processor's pixel_values."""
    shard_size_mb: int = 256
    """Start a new shard once one exceeds this size."""
    set_vars: list[str] = field(default_factory=list)
    """KEY=VALUE substitutions of {{KEY}} in the text (e.g. name=qvl); off by default, like the reference."""
    media_dir: str | None = None
    """Folder image paths are relative to; default: dataset_dir."""
    allow_outside_images: bool = False
    """Accept image paths that resolve outside the dataset (or media) directory."""
    force: bool = False
    """Rebuild even when the output's fingerprint matches."""
    quiet: bool = False
    """No progress bar or summary."""

    def __post_init__(self) -> None:
        if self.pixel_format not in PIXEL_FORMATS:
            raise QvlError(
                f"pixel_format must be one of {', '.join(PIXEL_FORMATS)}, got {self.pixel_format!r}"
            )
        if self.num_proc < 0:
            raise QvlError("num_proc must be >= 0")
        for item in self.set_vars:
            if "=" not in item:
                raise QvlError(f"--set-var expects KEY=VALUE, got {item!r}")

    @property
    def dataset_names(self) -> list[str]:
        return [name.strip() for name in self.dataset.split(",") if name.strip()]

    @property
    def workers(self) -> int:
        return self.num_proc or os.cpu_count() or 1


def load_config(cls: type[T], yaml_path: str | None, overrides: dict[str, Any]) -> T:
    """``cls`` from YAML (if given) with ``overrides`` (non-None CLI values) on top; unknown keys fail."""
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise QvlError(f"{path}: config file does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise QvlError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise QvlError(f"{path}: expected a mapping of option names to values")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QvlError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)
