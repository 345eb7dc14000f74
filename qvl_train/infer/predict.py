"""``qvl-train predict``: answers from the base model plus a LoRA adapter (or a merged export), one JSONL line
per row.

Prompts come from the one template (:func:`qvl_data.template.encode_prompt`): the system prompt, the
conversation before the last answer, and the final ``<|im_start|>assistant\\n``; a shard directory and a
dataset directory give the same ids (:mod:`qvl_train.infer.prompts`). Generation is batched
(:mod:`qvl_train.infer.generate`); the predictions file (:mod:`qvl_train.infer.predictions`) replaces an
existing file only when qvl wrote it as predictions (or with ``--overwrite``), never an input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qvl_data.errors import QvlError
from qvl_data.files import refuse_foreign
from qvl_data.schema import Rejection
from qvl_train.config import coerce_types, parse_tool_config
from qvl_train.distributed import setup_distributed, teardown_distributed
from qvl_train.infer.files import prepare_output_dir
from qvl_train.infer.generate import Generation, GenerationOptions, check_generation, load_model_for
from qvl_train.infer.predictions import is_predictions_file, predict
from qvl_train.infer.prompts import data_source

DESCRIPTION = (
    "Generate answers with the base model plus a LoRA adapter (or a merged export). Input: a shard directory "
    "(qvl-data build) or a dataset directory (dataset_info.json); the last answer of each row is the "
    "reference. Output: one JSON line per row (id, source, index, prompt, reference, prediction)."
)


@dataclass
class PredictConfig(GenerationOptions):
    model: str = "tiny"
    """Base model: a local Qwen2.5-VL checkpoint dir, a hub id, a merged export dir, or ``tiny``."""
    adapter: str = ""
    """LoRA adapter directory (a training run's output_dir or a checkpoint-N in it); empty: the model alone."""
    data: str = "data/qvl-demo"
    """A shard directory (manifest.json, from qvl-data build) or a dataset directory (dataset_info.json)."""
    dataset: str = ""
    """Comma-separated dataset names: required for a dataset directory; for shards, keep only these sources."""
    media_dir: str = ""
    """Dataset directory only: folder image paths are relative to (default: the dataset directory)."""
    output: str = "predictions.jsonl"
    """The JSON Lines file written (one line per row, in input order). It replaces an existing predictions
    file, complete, at the end; any other existing file only with --overwrite, and never a file read."""
    overwrite: bool = False
    """Replace an existing --output that is not a predictions file (never one of the inputs)."""
    max_rows: int = 0
    """Predict the first N rows only (0: all)."""

    def __post_init__(self) -> None:
        coerce_types(self)
        check_generation(self)
        if not self.data:
            raise QvlError("--data names no shard or dataset directory")
        if not self.output:
            raise QvlError("--output names no file")
        if self.max_rows < 0:
            raise QvlError(f"max_rows must be >= 0, got {self.max_rows}")
        if self.image_min_pixels < 0 or self.image_max_pixels < max(28 * 28, self.image_min_pixels):
            raise QvlError(
                f"image_max_pixels must be >= 784 and >= image_min_pixels, got {self.image_max_pixels}"
            )


def run(argv: list[str]) -> None:
    cfg = parse_tool_config(PredictConfig, argv, "qvl-train predict", DESCRIPTION)
    from rich.console import Console

    from qvl_train.model import check_compatible, model_config

    console = Console(stderr=True, highlight=False)
    source = data_source(cfg)
    refuse_foreign(
        cfg.output, is_predictions_file, "predictions file", "--output", cfg.overwrite, source.inputs
    )
    prepare_output_dir(Path(cfg.output).parent)
    check_compatible(model_config(cfg.model), source.processor, cfg.model)
    dist = setup_distributed(cfg)  # torchrun: each rank answers its share of the rows
    try:
        model, device, dtype = load_model_for(cfg, cfg.adapter, dist.local_rank)
        rejected: list[Rejection] = []
        started = time.perf_counter()
        results = predict(
            model,
            source.make(),
            source.total,
            source.tokenizer,
            source.processor,
            Generation.from_config(cfg),
            device,
            dtype,
            cfg.batch_size,
            cfg.output,
            cfg.quiet,
            on_rejection=rejected.append,
            dist=dist,
        )
    finally:
        teardown_distributed()
    if not dist.main:
        return
    for rejection in rejected[:10]:
        console.print(f"skipped {rejection.message} ({rejection.reason})", soft_wrap=True)
    more = f" ({len(rejected)} rows skipped)" if rejected else ""
    if not cfg.quiet or rejected:
        console.print(
            f"{len(results)} predictions in {time.perf_counter() - started:.1f}s -> {cfg.output}{more}"
        )
