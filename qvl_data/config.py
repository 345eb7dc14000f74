"""Build configuration: one dataclass, loadable from YAML, overridable from the CLI (both generated from its
fields, see qvl_data/options.py)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qvl_data.demo import DEMO_DATASETS as DEMO_DATASET_NAMES
from qvl_data.errors import QvlError
from qvl_data.executors import EXECUTORS
from qvl_data.family import TEMPLATES
from qvl_data.options import (
    OUTPUT_INPUT,
    OUTPUT_OPTION,
    declared,
    flag,
    option,
    public_name,
    suggest,
    yaml_aliases,
)
from qvl_data.processor import CONTROL_TOKENS
from qvl_data.shards import PIXEL_FORMATS
from qvl_data.vision import DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS

# The --dataset default: the demo sets of qvl_data/demo.py (their one home), as the option spells them.
DEMO_DATASETS = ",".join(DEMO_DATASET_NAMES)
# the smallest image the Qwen2-VL processor produces (one merged patch; LF's 28-px side rule for every family)
MIN_IMAGE_PIXELS = 28 * 28

T = TypeVar("T")


@dataclass
class BuildConfig:
    """The options of ``qvl-data convert | validate | build``, each declared once (see qvl_data/options.py):
    the commands' options, the YAML keys, and (``output``) what the fingerprint hashes and the manifest
    records under ``options``."""

    dataset_dir: str | None = option(None, common=True, output=OUTPUT_INPUT, stage="read")
    """Folder holding dataset_info.json and the data files; default: the cached LLaMA-Factory demo data."""
    dataset: str = option(DEMO_DATASETS, common=True, output=OUTPUT_INPUT, stage="read")
    """Comma-separated dataset names from dataset_info.json, built in this order."""
    model: str | None = option(None, common=True, output=OUTPUT_INPUT, stage="encode")
    """Local checkpoint dir or hub id whose tokenizer + image processor to use; default: the embedded one."""
    out: str = option("data/qvl-demo", common=True, stage="write")
    """Output directory (manifest.json, rejected.jsonl, shards/)."""
    num_proc: int = option(0, common=True, stage="encode")
    """Worker processes of the local executor; 0 means one per CPU."""
    executor: str = option(
        "local",
        common=True,
        stage="encode",
        choices=EXECUTORS,
        help="Where the tasks run: a local process pool, or a Ray cluster (same bytes).",
    )
    """Where the partition tasks run: local (a process pool of --num-proc workers) or ray (a Ray cluster;
    pip install -e ".[ray]"). The output is byte-identical either way."""
    ray_address: str | None = option(
        None,
        stage="encode",
        help="With --executor ray: a running cluster's address (e.g. auto); default: start Ray here.",
    )
    """With --executor ray: the address of a running cluster (e.g. ray://head:10001 or auto); default: start
    a Ray on this machine for the build. Every node must see the datasets, images and --out at the same
    paths."""
    partition_rows: int = option(
        0,
        output=OUTPUT_OPTION,
        stage="write",
        help="Rows per partition, the unit of work and of resuming (0: auto).",
    )
    """Rows per partition (one task, its own shard files, resumed as a whole); 0 = auto: max(32, rows/1024)
    per dataset."""
    cutoff_len: int = option(2048, common=True, output=OUTPUT_OPTION, stage="encode")
    """Maximum tokens per row, truncated as LLaMA-Factory does (image spans are never cut)."""
    image_max_pixels: int = option(DEFAULT_IMAGE_MAX_PIXELS, output=OUTPUT_OPTION, stage="encode")
    """Pre-resize images above this many pixels (LLaMA-Factory's image_max_pixels)."""
    image_min_pixels: int = option(DEFAULT_IMAGE_MIN_PIXELS, output=OUTPUT_OPTION, stage="encode")
    """Pre-resize images below this many pixels up to it."""
    mask_history: bool = option(False, output=OUTPUT_OPTION, stage="encode")
    """Train only on the last answer of each conversation (and truncate last turn first)."""
    template: str | None = option(
        None,
        output=OUTPUT_OPTION,
        stage="encode",
        metavar="NAME",  # checked in __post_init__: click's choices would print qwen3-vl for qwen3_vl
        help="Chat template (LLaMA-Factory's name); default: the model family's.",
    )
    """Chat template, by LLaMA-Factory's name: qwen2_vl, qwen3_vl (reasoning: think blocks) or
    qwen3_vl_nothink; default: the model family's (qwen2_vl for Qwen2-VL and Qwen2.5-VL, qwen3_vl for
    Qwen3-VL). It overrides the family's as LLaMA-Factory's --template does."""
    enable_thinking: bool = option(True, output=OUTPUT_OPTION, stage="encode")
    """With a reasoning template (qwen3_vl): answers without a think block get the empty one, trained
    (LLaMA-Factory's enable_thinking, default true); false removes every think block and puts the empty
    one in the prompt, untrained."""
    preserve_thinking: bool = option(False, output=OUTPUT_OPTION, stage="encode")
    """With a reasoning template and --mask-history: keep the history answers' think blocks (and give each
    answer without one the empty think), as LLaMA-Factory's preserve_thinking; default: history answers
    lose them and only the last answer gets the empty think."""
    pixel_format: str = option(
        "uint8",
        output=OUTPUT_OPTION,
        stage="write",
        choices=PIXEL_FORMATS,
        metavar="FORMAT",
        help="Stored pixels: uint8, webp (lossless, smallest) or float32 (see README).",
    )
    """Stored pixels. uint8: patches before rescale/normalize (1/8 of float32, fastest to load); webp: those
    patches as one lossless WebP per image (~1/20 of float32 on photos; ~7 ms per 512x512 image to decode
    in the loader); float32: the processor's pixel_values."""
    shard_size_mb: int = option(256, output=OUTPUT_OPTION, stage="write")
    """Start a new shard once one exceeds this many MiB."""
    set_vars: list[str] = option(
        default_factory=list, output=OUTPUT_OPTION, stage="read", name="set_var", metavar="KEY=VALUE"
    )
    """Substitute {{KEY}} in the text (e.g. --set-var name=Qwen; repeatable). Off by default, like
    LLaMA-Factory."""
    media_dir: str | None = option(None, output=OUTPUT_OPTION, stage="read")
    """Folder image paths are relative to; default: the dataset dir."""
    allow_outside_images: bool = option(False, output=OUTPUT_OPTION, stage="read")
    """Accept image paths that resolve outside the dataset (or media) directory."""
    image_store: str | None = option(None, stage="write")
    """Folder of the image store (each distinct image's pixels, once); default: images/ in --out. One
    store may serve several builds (`qvl-data gc-images DIR` removes what none of them uses)."""
    force: bool = option(False, stage="write")
    """Rebuild even when the output's fingerprint matches."""
    quiet: bool = option(False, stage="encode")
    """No progress bar or summary."""

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
        if self.template is not None and self.template not in TEMPLATES:
            raise QvlError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.executor not in EXECUTORS:
            raise QvlError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
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


def option_name(field_name: str, cls: type = BuildConfig) -> str:
    """The command-line spelling of a config field, for messages (``cutoff_len`` -> ``--cutoff-len``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return flag(fields[field_name]) if field_name in fields else "--" + field_name.replace("_", "-")


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
            raise QvlError(f"{option_name(f.name, type(config))} must be {expected}, got {value!r}")


def load_config(cls: type[T], yaml_path: str | None, overrides: dict[str, Any]) -> T:
    """``cls`` from YAML (if given) with ``overrides`` (non-None CLI values) on top. An unknown key fails with
    a did-you-mean; a ``cli_only`` option that the file sets true fails with the reason."""
    values: dict[str, Any] = {}
    where = ""
    if yaml_path:
        path = Path(yaml_path)
        where = f"{path}: "
        if not path.is_file():
            raise QvlError(f"{path}: config file does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise QvlError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise QvlError(f"{path}: expected a mapping of option names to values")
        aliases = yaml_aliases(cls)
        for key, value in loaded.items():
            values[aliases.get(key, key)] = value
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(values) | set(given)):
        if name not in fields:
            known = [public_name(f) for f in fields.values()]
            raise QvlError(
                f"{where}unknown option {name!r}{suggest(str(name), known)}; the keys are the long options of "
                "--help with _ for -"
            )
    for name, value in values.items():
        reason = declared(fields[name], "cli_only")
        if reason and value is True and name not in given:
            raise QvlError(
                f"{yaml_path}: {public_name(fields[name])} {reason}, so it is a command-line choice only; "
                f"remove it from the config file and pass {flag(fields[name])} when you mean it"
            )
    values.update(given)
    return cls(**values)
