"""Where prompts come from. Two inputs give the same ids token for token:

* a **shard directory** (``qvl-data build``): each row's stored ``input_ids`` cut where its last answer starts
  (:func:`qvl_data.encode.prompt_and_answer` reads that from the labels), with the row's stored pixels; the
  cut-off answer is the reference;
* a **dataset directory** (``dataset_info.json``): rows read and validated as the build reads them
  (:mod:`qvl_data.sources`), images through the build's pre-resize and processor
  (:func:`qvl_data.encode.encode_prompt_record`), no torchvision; the last answer is the reference.

Benchmark records (:mod:`qvl_train.infer.benchmarks`) take the second path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_data.encode import (
    EncodedPrompt,
    EncodeOptions,
    encode_prompt_record,
    processor_summary,
    prompt_and_answer,
)
from qvl_data.errors import QvlError
from qvl_data.family import template_for
from qvl_data.format import ProcessorSummary
from qvl_data.processor import load_image_processor, load_tokenizer, model_family
from qvl_data.schema import Record, Rejection
from qvl_train.infer.files import require_regular_file


@dataclass
class PromptSource:
    """Where prompts come from: the tokenizer that decodes answers, the processor facts that turn stored
    pixels into pixel_values, the row count, a fresh iterator over the prompts per call, and the files
    and folders read (no output may replace them)."""

    tokenizer: Any
    processor: ProcessorSummary
    total: int
    make: Callable[[], Iterator[EncodedPrompt | Rejection]]
    inputs: list[Path] = field(default_factory=list)


def embedded_or(model: str) -> str | None:
    """A manifest's processor ``model`` -> what :mod:`qvl_data.processor` loads (None: the embedded one)."""
    return None if model in ("", "embedded") else model


def shard_prompts(
    data_dir: str | Path, tokenizer: Any, sources: list[str] | None = None, max_rows: int = 0
) -> tuple[int, Iterator[EncodedPrompt]]:
    """(rows, the prompts of a build's rows): each row's ids before its last answer (the labels say where it
    starts) with the row's stored pixels; the answer, decoded, is the reference."""
    from qvl_data.shards import ShardSet

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
            try:
                prompt, answer = prompt_and_answer(
                    shards.read(i, "input_ids").tolist(), shards.read(i, "labels").tolist()
                )
            except ValueError:
                raise QvlError(
                    f"{data_dir}: row {i} ({meta['source']} row {meta['index']}) has no trained answer"
                ) from None
            grids = [tuple(g) for g in meta["image_grid_thw"] or []]
            pixels = shards.read_pixel_patches(i) if grids else None
            shards.release(i)
            yield EncodedPrompt(
                id=meta["id"],
                source=meta["source"],
                index=meta["index"],
                input_ids=prompt,
                reference=tokenizer.decode(answer, skip_special_tokens=False),
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
    for record in records:
        if isinstance(record, Rejection):
            yield record
        else:
            yield encode_prompt_record(record, tokenizer, image_processor, options)


def dataset_files(dataset_dir: str | Path, names: list[str]) -> list[Path]:
    """dataset_info.json and the data file (or folder) of each of ``names``: what reading them opens."""
    from qvl_data.sources import resolve_datasets

    specs = resolve_datasets(Path(dataset_dir), names)
    for spec in specs:
        if not spec.path.is_dir():  # a folder's data files are its regular .json/.jsonl files
            require_regular_file(spec.path, f"data file of dataset {spec.name!r}")
    return [Path(dataset_dir) / "dataset_info.json", *(spec.path for spec in specs)]


def dataset_records(
    dataset_dir: str | Path, names: list[str], media_dir: str = "", max_rows: int = 0
) -> list[Record | Rejection]:
    """The rows of ``names`` in a dataset directory, read and validated as the build reads them."""
    from qvl_data.sources import ReadOptions, iter_records, load_dataset_info, resolve_datasets

    if not names:
        known = ", ".join(sorted(load_dataset_info(Path(dataset_dir)))[:20])
        raise QvlError(
            f"{dataset_dir} is a dataset directory: name the datasets with --dataset (known: {known})"
        )
    dataset_files(dataset_dir, names)  # every file a regular one, before anything opens them
    options = ReadOptions(
        dataset_dir=Path(dataset_dir), media_dir=Path(media_dir).resolve() if media_dir else None
    )
    items: list[Record | Rejection] = []
    for item in iter_records(resolve_datasets(Path(dataset_dir), names), options):
        items.append(item)
        if max_rows > 0 and len(items) >= max_rows:
            break
    return items


def encode_options(cfg: Any, processor: str | None) -> EncodeOptions:
    """The build's image bounds from a predict or score config (prompts are never truncated), and the chat
    template of the processor's family (a build's rows carry theirs already)."""
    return EncodeOptions(
        image_max_pixels=cfg.image_max_pixels,
        image_min_pixels=cfg.image_min_pixels,
        template=template_for(model_family(processor)).name,
    )


def records_source(records: list[Record | Rejection], cfg: Any, inputs: Iterable[Path] = ()) -> PromptSource:
    """Prompts of unified records (a dataset directory's, a benchmark's), encoded as the build encodes;
    ``inputs``: the files they were read from (their images are added)."""
    processor = embedded_or(cfg.processor)
    tokenizer, image_processor = load_tokenizer(processor), load_image_processor(processor)
    options = encode_options(cfg, processor)
    images = {  # the image files (embedded images are inside ``inputs``)
        Path(path)
        for r in records
        if not isinstance(r, Rejection)
        for path in r["images"]
        if isinstance(path, str)
    }
    return PromptSource(
        tokenizer,
        processor_summary(processor, tokenizer, image_processor),
        len(records),
        lambda: record_prompts(records, tokenizer, image_processor, options),
        [*inputs, *sorted(images)],
    )


def data_source(cfg: Any) -> PromptSource:
    """The prompts of ``cfg.data``: a shard directory or a dataset directory (``cfg.dataset`` names)."""
    data = Path(cfg.data)
    names = [n.strip() for n in cfg.dataset.split(",") if n.strip()]
    if (data / "manifest.json").is_file():
        from qvl_data.shards import load_manifest

        summary = load_manifest(data).processor
        tokenizer = load_tokenizer(embedded_or(summary.model))
        total, _ = shard_prompts(data, tokenizer, names, cfg.max_rows)
        return PromptSource(
            tokenizer, summary, total, lambda: shard_prompts(data, tokenizer, names, cfg.max_rows)[1], [data]
        )
    if (data / "dataset_info.json").is_file():
        records = dataset_records(data, names, cfg.media_dir, cfg.max_rows)
        return records_source(records, cfg, dataset_files(data, names))
    raise QvlError(
        f"{data}: neither a shard directory (manifest.json) nor a dataset directory (dataset_info.json)"
    )
