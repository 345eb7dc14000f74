"""Build configuration: one dataclass, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from qvl_data.demo import DEMO_DATASETS as DEMO_DATASET_NAMES
from qvl_data.errors import QvlError
from qvl_data.processor import CONTROL_TOKENS
from qvl_data.shards import PIXEL_FORMATS

# The --dataset default: the demo sets of qvl_data/demo.py (their one home), as the option spells them.
DEMO_DATASETS = ",".join(DEMO_DATASET_NAMES)
MIN_IMAGE_PIXELS = 28 * 28  # the smallest image the Qwen2-VL processor produces (one merged patch)

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
    """Worker processes of the local executor; 0 means one per CPU."""
    executor: str = "local"
    """Where the partition tasks run: local (a process pool of --num-proc workers) or ray (a Ray cluster)."""
    ray_address: str | None = None
    """With --executor ray: the address of a running cluster (e.g. ray://head:10001 or auto); default: start
    a Ray on this machine for the build."""
    partition_rows: int = 0
    """Rows per partition (one task, its own shard files); 0 = auto: max(32, rows/1024) per dataset."""
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

    # YAML keys are the long option names with "_"; these options' field names differ from them.
    YAML_ALIASES: ClassVar[dict[str, str]] = {"set_var": "set_vars"}

    def __post_init__(self) -> None:
        # YAML spellings: `dataset: [a, b]` and `set_var: {name: x}` are natural there.
        if isinstance(self.dataset, (list, tuple)):
            self.dataset = ",".join(str(name) for name in self.dataset)
        if isinstance(self.set_vars, dict):
            self.set_vars = [f"{key}={value}" for key, value in self.set_vars.items()]
        elif isinstance(self.set_vars, (str, tuple)):
            self.set_vars = [self.set_vars] if isinstance(self.set_vars, str) else list(self.set_vars)
        check_types(self)
        if self.pixel_format not in PIXEL_FORMATS:
            raise QvlError(
                f"--pixel-format must be one of {', '.join(PIXEL_FORMATS)}, got {self.pixel_format!r}"
            )
        if self.executor not in ("local", "ray"):
            raise QvlError(f"--executor must be local or ray, got {self.executor!r}")
        at_least = {
            "num_proc": 0,
            "partition_rows": 0,
            "cutoff_len": 1,
            "image_min_pixels": 0,
            "shard_size_mb": 1,
        }
        # The processor's smallest image is 28x28: a lower bound only makes images degenerate.
        at_least["image_max_pixels"] = max(MIN_IMAGE_PIXELS, self.image_min_pixels)
        for name, low in at_least.items():
            if getattr(self, name) < low:
                bound = "--image-min-pixels" if name == "image_max_pixels" and low > MIN_IMAGE_PIXELS else low
                raise QvlError(f"{option_name(name)} must be >= {bound}, got {getattr(self, name)}")
        for item in self.set_vars:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise QvlError(f"--set-var expects KEY=VALUE, got {item!r}")
            token = CONTROL_TOKENS.search(value)
            if token:
                raise QvlError(
                    f"--set-var {key}: the value contains the model's control token {token.group()}"
                )
        if not self.dataset_names:
            raise QvlError("--dataset names no dataset")

    @property
    def dataset_names(self) -> list[str]:
        return [name.strip() for name in self.dataset.split(",") if name.strip()]

    @property
    def workers(self) -> int:
        return self.num_proc or os.cpu_count() or 1


def option_name(field_name: str) -> str:
    """The command-line spelling of a config field, for messages (``cutoff_len`` -> ``--cutoff-len``)."""
    aliases = {v: k for k, v in BuildConfig.YAML_ALIASES.items()}
    return "--" + aliases.get(field_name, field_name).replace("_", "-")


def check_types(config: Any) -> None:
    """One line naming the option when a value (typically from YAML) has the wrong type."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind in ("str", "str | None"):
            ok = isinstance(value, str) or (value is None and kind == "str | None")
        elif kind == "list[str]":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            continue
        if not ok:
            expected = {"list[str]": "a list of strings", "str | None": "a string"}.get(kind, f"a {kind}")
            raise QvlError(f"{option_name(f.name)} must be {expected}, got {value!r}")


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
        aliases = getattr(cls, "YAML_ALIASES", {})
        for key, value in loaded.items():
            values[aliases.get(key, key)] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QvlError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)
