"""``qvl-train predict``: answers from the base model plus a LoRA adapter (or a merged export), one JSONL line
per row.

Prompts come from the one template (:func:`qvl_data.template.encode_prompt`): the system prompt, the
conversation before the last answer, and the final ``<|im_start|>assistant\\n``. Two inputs give the same
ids token for token:

* a **shard directory** (``qvl-data build``): each row's stored ``input_ids`` cut where its last answer starts
  (:func:`qvl_data.template.last_answer_start` reads that from the labels), with the row's stored pixels;
  the cut-off answer is the reference;
* a **dataset directory** (``dataset_info.json``): rows read and validated as the build reads them, images
  through the build's pre-resize and processor (:func:`qvl_data.encode.encode_prompt_record`), no
  torchvision; the last answer is the reference.

Generation is batched with left padding and an explicit attention mask. transformers 5.x computes the 3-D
RoPE positions of a left-padded Qwen2.5-VL batch from that mask (``get_rope_index`` drops the padding of each
row, and the cached ``rope_deltas`` continue each row's positions while decoding), so a batch gives the same
greedy answers as one row at a time (``tests/test_predict.py`` checks it). Rows are generated in length
order within a window of a few batches (less padding) and written in input order.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvl_data.encode import EncodedPrompt
from qvl_data.errors import QvlError
from qvl_data.format import ProcessorSummary
from qvl_data.processor import (
    IM_END_ID,
    IMAGE_PAD_TOKEN,
    PAD_ID,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)
from qvl_data.schema import Record, Rejection
from qvl_data.template import IGNORE_INDEX
from qvl_data.vision import DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS
from qvl_train.config import coerce_types, parse_tool_config

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from qvl_data.encode import EncodeOptions

#: Rows encoded and sorted by length together: enough to batch similar lengths, few enough images in memory.
WINDOW_BATCHES = 8
NEWLINE_ID = 198  # "\n", which the template puts after every <|im_end|>
#: Qwen2.5-VL-Instruct's generation_config.json ends a turn at either token.
EOS_IDS = (IM_END_ID, PAD_ID)

DESCRIPTION = (
    "Generate answers with the base model plus a LoRA adapter (or a merged export). Input: a shard directory "
    "(qvl-data build) or a dataset directory (dataset_info.json); the last answer of each row is the "
    "reference. Output: one JSON line per row (id, source, index, prompt, reference, prediction)."
)


@dataclass
class GenerationOptions:
    """The options every generating command (predict, score) shares: batching, decoding, how images of a
    dataset directory or benchmark are prepared, and the device."""

    batch_size: int = 8
    """Prompts per generate() call (left-padded)."""
    max_new_tokens: int = 1024
    """Most tokens generated per answer (LLaMA-Factory's default)."""
    do_sample: bool = False
    """Sample instead of greedy decoding (greedy: the same answers on every run)."""
    temperature: float = 1.0
    """Sampling temperature (with --do-sample)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (with --do-sample)."""
    top_k: int = 50
    """Sample among the k most likely tokens, 0 for all (with --do-sample)."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already in the prompt or answer (1.0: none; Qwen2.5-VL's own config uses 1.05)."""
    seed: int = 42
    """Seed of the sampling RNG."""
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    """Images read here (a dataset directory, benchmark images): pre-resize those above this many pixels (the
    build's --image-max-pixels). Shards keep their build's pixels."""
    image_min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS
    """Images read here: pre-resize those below this many pixels up to it."""
    processor: str = ""
    """Images and text read here: checkpoint dir or hub id whose tokenizer + image processor to use (the
    build's --model); default: the embedded one. Shards use the processor recorded in their manifest."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cuda`` or ``cpu``."""
    bf16: bool = True
    """On CUDA: weights in bfloat16 (CPU always uses float32)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    quiet: bool = False
    """No progress bars or summary lines (skipped rows and score tables are still printed)."""


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
    """The JSON Lines file written (one line per row, in input order)."""
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


def check_generation(cfg: Any) -> None:
    """One-line errors for the generation and device options a predict or score config shares."""
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise QvlError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise QvlError(f"temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise QvlError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise QvlError(f"top_k must be >= 0, got {cfg.top_k}")
    if cfg.repetition_penalty <= 0:
        raise QvlError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise QvlError(f"device must be auto, cuda or cpu, got {cfg.device!r}")


# ------------------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class Generation:
    """How answers are decoded (the generation options of a predict or score config). The defaults are
    the commands' own, read from :class:`GenerationOptions` so that they live in one place."""

    max_new_tokens: int = GenerationOptions.max_new_tokens
    do_sample: bool = GenerationOptions.do_sample
    temperature: float = GenerationOptions.temperature
    top_p: float = GenerationOptions.top_p
    top_k: int = GenerationOptions.top_k
    repetition_penalty: float = GenerationOptions.repetition_penalty
    seed: int = GenerationOptions.seed

    @classmethod
    def from_config(cls, cfg: GenerationOptions) -> Generation:
        """The decoding values of a predict or score config (fields of the same names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def generation_config(self) -> GenerationConfig:
        """Every decoding value set explicitly: transformers fills unset ones from the checkpoint's
        generation_config.json, and Qwen2.5-VL-Instruct's samples (top_k 1, repetition penalty 1.05)."""
        from transformers import GenerationConfig

        sampling = (
            {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
            if self.do_sample
            else {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # neutral: no warning, nothing inherited
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=list(EOS_IDS),
            pad_token_id=PAD_ID,
            **sampling,
        )


def collate_prompts(prompts: list[EncodedPrompt], pad_id: int = PAD_ID) -> dict[str, Any]:
    """Left-pad the prompts into one batch: ``input_ids`` (pad_id on the left), ``attention_mask`` (0 there),
    and all rows' pixels and grids concatenated in row order (None without images), the keys that
    :func:`qvl_train.steps.batch_to_inputs` reads."""
    length = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        input_ids[i, length - n :] = torch.as_tensor(prompt.input_ids, dtype=torch.long)
        attention_mask[i, length - n :] = 1
    pixels = [torch.from_numpy(p.pixels) for p in prompts if p.pixels is not None and len(p.pixels)]
    grids = [g for p in prompts for g in p.image_grid_thw]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": torch.cat(pixels) if pixels else None,
        "image_grid_thw": torch.tensor(grids, dtype=torch.long) if grids else None,
    }


def answer_ids(generated: torch.Tensor) -> list[int]:
    """One row's generated ids up to (not including) its first end-of-turn or padding token."""
    ids = generated.tolist()
    for k, token in enumerate(ids):
        if token in EOS_IDS:
            return ids[:k]
    return ids


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: list[EncodedPrompt],
    processor: ProcessorSummary,
    generation: Generation | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """The generated ids of each prompt's answer, up to its end of turn (greedy unless ``generation`` samples).
    Pixels reach the model through :func:`qvl_train.steps.batch_to_inputs`, the training path (uint8 patches
    become the processor's pixel_values on the device); ``device`` and ``dtype`` default to the model's."""
    from qvl_train.steps import batch_to_inputs

    weights = next(model.parameters())
    device, dtype = device or weights.device, dtype or weights.dtype
    generation = generation or Generation()
    batch = collate_prompts(prompts)
    inputs = batch_to_inputs(batch, device, dtype, processor)
    # always the mask: batch_to_inputs drops it for right-padded (here: equal-length) batches, and generate
    # would otherwise infer one from the pad id
    inputs["attention_mask"] = batch["attention_mask"].to(device)
    output = model.generate(**inputs, generation_config=generation.generation_config())
    return [answer_ids(row) for row in output[:, batch["input_ids"].shape[1] :].cpu()]


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """An answer's text: decoded without special tokens and stripped, as LLaMA-Factory's predictions are."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


_VISION_SPAN = re.compile(
    re.escape(VISION_START_TOKEN) + f"(?:{re.escape(IMAGE_PAD_TOKEN)})*" + re.escape(VISION_END_TOKEN)
)


def prompt_text(tokenizer: Any, input_ids: list[int]) -> str:
    """The prompt as text, control tokens kept, each image span shown as ``<image>``."""
    return _VISION_SPAN.sub("<image>", tokenizer.decode(input_ids, skip_special_tokens=False))


# ------------------------------------------------------------------------------------------ prompt sources


def without_turn_end(answer: list[int]) -> list[int]:
    """An answer's ids without the ``<|im_end|>\n`` the template closes it with (or the ``<|im_end|>`` alone,
    when the build's truncation kept only that)."""
    if answer[-2:] == [IM_END_ID, NEWLINE_ID]:
        return answer[:-2]
    return answer[:-1] if answer[-1:] == [IM_END_ID] else answer


def shard_prompts(
    data_dir: str | Path, tokenizer: Any, sources: list[str] | None = None, max_rows: int = 0
) -> tuple[int, Iterator[EncodedPrompt]]:
    """(rows, the prompts of a build's rows): each row's ids before its last answer (the labels say where it
    starts) with the row's stored pixels; the answer, decoded, is the reference."""
    from qvl_data.shards import ShardSet
    from qvl_data.template import last_answer_start

    shards = ShardSet(
        Path(data_dir), columns=["id", "source", "index", "input_ids", "labels", "image_grid_thw", "pixels"]
    )
    if sources:
        unknown = sorted(set(sources) - set(shards.manifest.sources))
        if unknown:
            raise QvlError(
                f"{data_dir}: no source {', '.join(unknown)} in the build ({', '.join(shards.manifest.sources)})"
            )
        import numpy as np

        column = np.concatenate([t.column("source").to_numpy(zero_copy_only=False) for t in shards.tables])
        rows = np.flatnonzero(np.isin(column, sources)).tolist()
    else:
        rows = list(range(len(shards)))
    rows = rows[:max_rows] if max_rows > 0 else rows

    def prompts() -> Iterator[EncodedPrompt]:
        for i in rows:
            meta = shards.row(i, ("id", "source", "index", "image_grid_thw"))
            ids = shards.read(i, "input_ids").tolist()
            labels = shards.read(i, "labels").tolist()
            try:
                start = last_answer_start(labels)
            except ValueError:
                raise QvlError(
                    f"{data_dir}: row {i} ({meta['source']} row {meta['index']}) has no trained answer"
                ) from None
            end = start
            while end < len(labels) and labels[end] != IGNORE_INDEX:
                end += 1
            grids = [tuple(g) for g in meta["image_grid_thw"] or []]
            pixels = shards.read_pixel_patches(i) if grids else None
            shards.release(i)
            yield EncodedPrompt(
                id=meta["id"],
                source=meta["source"],
                index=meta["index"],
                input_ids=ids[:start],
                reference=tokenizer.decode(without_turn_end(ids[start:end]), skip_special_tokens=False),
                image_grid_thw=grids,
                pixels=pixels,
            )

    return len(rows), prompts()


def record_prompts(
    records: Iterable[Record | Rejection],
    tokenizer: Any,
    image_processor: Any,
    options: EncodeOptions,
) -> Iterator[EncodedPrompt | Rejection]:
    """Unified records (e.g. from :func:`qvl_data.sources.iter_records`, or a benchmark's) -> their prompts,
    through the build's image path; rejections pass through."""
    from qvl_data.encode import encode_prompt_record

    for record in records:
        if isinstance(record, Rejection):
            yield record
        else:
            yield encode_prompt_record(record, tokenizer, image_processor, options)


def dataset_records(
    dataset_dir: str | Path, names: list[str], media_dir: str = "", max_rows: int = 0
) -> list[Record | Rejection]:
    """The rows of ``names`` in a dataset directory, read and validated as the build reads them."""
    from qvl_data.sources import ReadOptions, iter_records, resolve_datasets

    if not names:
        from qvl_data.sources import load_dataset_info

        known = ", ".join(sorted(load_dataset_info(Path(dataset_dir)))[:20])
        raise QvlError(
            f"{dataset_dir} is a dataset directory: name the datasets with --dataset (known: {known})"
        )
    options = ReadOptions(
        dataset_dir=Path(dataset_dir), media_dir=Path(media_dir).resolve() if media_dir else None
    )
    items: list[Record | Rejection] = []
    for item in iter_records(resolve_datasets(Path(dataset_dir), names), options):
        items.append(item)
        if max_rows > 0 and len(items) >= max_rows:
            break
    return items


# ------------------------------------------------------------------------------------------ the run


def _progress(total: int, quiet: bool, label: str):
    """The bar over prompts: rows/s and generated tokens/s since the start, on stderr (stdout may be piped)."""
    from rich.console import Console

    from qvl_data.progress import rows_progress

    console = Console(stderr=True, highlight=False)
    return rows_progress(total, label, {"tokens": "tok/s"}, quiet=quiet, decimals=2, console=console)


def _windows(
    items: Iterator[EncodedPrompt | Rejection], size: int
) -> Iterator[list[EncodedPrompt | Rejection]]:
    window: list[EncodedPrompt | Rejection] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def predict(
    model: torch.nn.Module,
    prompts: Iterable[EncodedPrompt | Rejection],
    total: int,
    tokenizer: Any,
    processor: ProcessorSummary,
    generation: Generation,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    output: str | Path | None = None,
    quiet: bool = False,
    label: str = "predict",
    on_rejection: Callable[[Rejection], None] | None = None,
    references: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Answer every prompt; returns (and writes to ``output`` as JSON Lines, in input order) one dict per
    prompt: id, source, index, prompt (text, images as ``<image>``), reference, prediction. Rejected rows
    (an unreadable image, say) go to ``on_rejection`` and get no line. ``references`` (by id) replaces the
    prompts' own reference, e.g. a benchmark's list of human answers."""
    if generation.do_sample:
        torch.manual_seed(generation.seed)
    results: list[dict[str, Any]] = []
    out_file = None
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(output, "w", encoding="utf-8")  # closed below
    progress, task = _progress(total, quiet, label)
    tokens = 0  # generated, for the progress bar's rate
    try:
        with progress:
            for window in _windows(iter(prompts), batch_size * WINDOW_BATCHES):
                ready = []
                for item in window:
                    if isinstance(item, Rejection):
                        if on_rejection is not None:
                            on_rejection(item)
                        progress.advance(task)
                    else:
                        ready.append(item)
                answers: dict[int, str] = {}
                order = sorted(range(len(ready)), key=lambda k: len(ready[k].input_ids))
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    generated = generate_batch(
                        model, [ready[k] for k in chunk], processor, generation, device, dtype
                    )
                    for k, ids in zip(chunk, generated, strict=True):
                        answers[k] = decode_answer(tokenizer, ids)
                    tokens += sum(map(len, generated))
                    progress.update(task, advance=len(chunk), tokens=tokens)
                for k, item in enumerate(ready):
                    line = {
                        "id": item.id,
                        "source": item.source,
                        "index": item.index,
                        "prompt": prompt_text(tokenizer, item.input_ids),
                        "reference": references[item.id] if references is not None else item.reference,
                        "prediction": answers[k],
                    }
                    results.append(line)
                    if out_file is not None:
                        out_file.write(json.dumps(line, ensure_ascii=False) + "\n")
                if out_file is not None:
                    out_file.flush()
    finally:
        if out_file is not None:
            out_file.close()
    return results


def load_model_for(cfg: Any, adapter: str) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """The base model ``cfg.model`` with ``adapter`` (none when empty) on ``cfg.device``, for generation."""
    from qvl_train.distributed import pick_device
    from qvl_train.model import load_for_inference

    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32
    model = load_for_inference(cfg.model, adapter, device, dtype, cfg.attn_implementation)
    return model, device, dtype


def embedded_or(model: str) -> str | None:
    """A manifest's processor ``model`` -> what :mod:`qvl_data.processor` loads (None: the embedded one)."""
    return None if model in ("", "embedded") else model


def processor_summary(model: str | None) -> ProcessorSummary:
    """What a build's manifest records about a processor, for prompts encoded here."""
    from qvl_data.task import processor_task

    return ProcessorSummary(**processor_task(model))


@dataclass
class PromptSource:
    """Where prompts come from: the tokenizer that decodes answers, the processor facts that turn stored
    pixels into pixel_values, the row count, and a fresh iterator over the prompts per call."""

    tokenizer: Any
    processor: ProcessorSummary
    total: int
    make: Callable[[], Iterator[EncodedPrompt | Rejection]]


def encode_options(cfg: Any) -> EncodeOptions:
    """The build's image bounds from a predict or score config (prompts are never truncated)."""
    from qvl_data.encode import EncodeOptions

    return EncodeOptions(image_max_pixels=cfg.image_max_pixels, image_min_pixels=cfg.image_min_pixels)


def records_source(records: list[Record | Rejection], cfg: Any) -> PromptSource:
    """Prompts of unified records (a dataset directory's, a benchmark's), encoded as the build encodes."""
    from qvl_data.processor import load_image_processor, load_tokenizer

    processor = embedded_or(cfg.processor)
    tokenizer, image_processor = load_tokenizer(processor), load_image_processor(processor)
    options = encode_options(cfg)
    return PromptSource(
        tokenizer,
        processor_summary(processor),
        len(records),
        lambda: record_prompts(records, tokenizer, image_processor, options),
    )


def data_source(cfg: Any) -> PromptSource:
    """The prompts of ``cfg.data``: a shard directory or a dataset directory (``cfg.dataset`` names)."""
    data = Path(cfg.data)
    names = [n.strip() for n in cfg.dataset.split(",") if n.strip()]
    if (data / "manifest.json").is_file():
        from qvl_data.processor import load_tokenizer
        from qvl_data.shards import load_manifest

        summary = load_manifest(data).processor
        tokenizer = load_tokenizer(embedded_or(summary.model))
        total, _ = shard_prompts(data, tokenizer, names, cfg.max_rows)
        return PromptSource(
            tokenizer, summary, total, lambda: shard_prompts(data, tokenizer, names, cfg.max_rows)[1]
        )
    if (data / "dataset_info.json").is_file():
        return records_source(dataset_records(data, names, cfg.media_dir, cfg.max_rows), cfg)
    raise QvlError(
        f"{data}: neither a shard directory (manifest.json) nor a dataset directory (dataset_info.json)"
    )


def run(argv: list[str]) -> None:
    cfg = parse_tool_config(PredictConfig, argv, "qvl-train predict", DESCRIPTION)
    from rich.console import Console

    from qvl_train.model import check_compatible, model_config

    console = Console(stderr=True, highlight=False)
    source = data_source(cfg)
    check_compatible(model_config(cfg.model), source.processor, cfg.model)
    model, device, dtype = load_model_for(cfg, cfg.adapter)
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
    )
    for rejection in rejected[:10]:
        console.print(f"skipped {rejection.message} ({rejection.reason})", soft_wrap=True)
    more = f" ({len(rejected)} rows skipped)" if rejected else ""
    if not cfg.quiet or rejected:
        console.print(
            f"{len(results)} predictions in {time.perf_counter() - started:.1f}s -> {cfg.output}{more}"
        )
