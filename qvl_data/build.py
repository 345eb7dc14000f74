"""The build pipeline: read -> validate -> unify -> encode (parallel) -> shard, with fingerprint and progress.

Rows flow through in input order and are never all held in memory: the main process streams records
to a pool of workers (processor loaded once per worker), takes results back in order and hands them to
the ``ShardWriter``; rejections go to ``rejected.jsonl`` as they come.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvl_data import __version__, shards, template
from qvl_data.config import BuildConfig
from qvl_data.encode import EncodedRow, EncodeOptions, encode_record
from qvl_data.errors import QvlError
from qvl_data.schema import Rejection
from qvl_data.sources import DatasetSpec, ReadOptions, iter_records, resolve_datasets

# Workers are forked after the tokenizer is loaded: keep its Rust thread pool out of the children.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class SourceTotals:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    max_length: int = 0
    truncated: int = 0
    rejected: int = 0


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    skipped: bool = False  # True when the fingerprint matched and nothing was done
    seconds: float = 0.0
    sources: dict[str, SourceTotals] = field(default_factory=dict)


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(model: str | None, options: EncodeOptions) -> None:
    """Load the processor once per process (inherited as is when the pool forks)."""
    if _WORKER.get("key") != (model, options):
        from qvl_data.processor import load_image_processor, load_tokenizer

        _WORKER.update(
            key=(model, options),
            tokenizer=load_tokenizer(model),
            image_processor=load_image_processor(model),
            options=options,
        )


def _encode_items(items: list[dict | Rejection]) -> list[EncodedRow | Rejection]:
    tok, proc, opts = _WORKER["tokenizer"], _WORKER["image_processor"], _WORKER["options"]
    return [item if isinstance(item, Rejection) else encode_record(item, tok, proc, opts) for item in items]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def worker_pool(num_proc: int, initargs: tuple) -> Iterator[Any]:
    """A process pool whose workers hold the processor, or None for ``num_proc <= 1`` (run in-process).

    Create it before any thread (e.g. a progress bar) starts: fork shares the processor the parent
    already loaded; where fork is unavailable the initializer loads it in each worker.
    """
    _init_worker(*initargs)
    if num_proc <= 1:
        yield None
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, initializer=_init_worker, initargs=initargs) as pool:
        yield pool


def ordered_map(
    pool: Any, fn: Callable[[list], list], items: Iterable, max_pending: int = 4, chunk_size: int = 8
) -> Iterator:
    """``fn`` over chunks of ``items`` (in ``pool`` if given); results in input order, bounded in flight.

    At most ``max_pending`` chunks are outstanding, so memory stays flat however long the input is.
    """
    if pool is None:
        for chunk in _chunks(items, chunk_size):
            yield from fn(chunk)
        return
    pending: deque = deque()
    for chunk in _chunks(items, chunk_size):
        pending.append(pool.apply_async(fn, (chunk,)))
        if len(pending) >= max_pending:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# ---------------------------------------------------------------- main side


def encode_options(config: BuildConfig) -> EncodeOptions:
    return EncodeOptions(
        cutoff_len=config.cutoff_len,
        image_max_pixels=config.image_max_pixels,
        image_min_pixels=config.image_min_pixels,
        mask_history=config.mask_history,
        pixel_format=config.pixel_format,
    )


def read_options(config: BuildConfig, dataset_dir: Path) -> ReadOptions:
    set_vars = tuple(tuple(item.split("=", 1)) for item in config.set_vars)
    return ReadOptions(
        dataset_dir=dataset_dir,
        media_dir=Path(config.media_dir) if config.media_dir else None,
        allow_outside_images=config.allow_outside_images,
        set_vars=set_vars,  # type: ignore[arg-type]
    )


def resolve_dataset_dir(config: BuildConfig) -> Path:
    if config.dataset_dir:
        path = Path(config.dataset_dir)
        if not path.is_dir():
            raise QvlError(f"{path}: dataset directory does not exist")
        return path
    from qvl_data.demo import fetch_demo_data

    return fetch_demo_data()


def fingerprint(
    specs: list[DatasetSpec], dataset_dir: Path, image_paths: set[str], config: BuildConfig
) -> str:
    """Hash of everything the output depends on: inputs, processor, template, options, qvl version.

    Dataset files are hashed by content; images by (path, size, mtime) so that deciding "nothing to do"
    does not read every image twice.
    """
    from qvl_data.demo import sha256_file
    from qvl_data.processor import processor_files_digest

    h = hashlib.sha256()
    h.update(f"qvl {__version__} format {shards.FORMAT_VERSION}\n".encode())
    h.update(sha256_file(dataset_dir / "dataset_info.json").encode())
    for spec in specs:
        h.update(
            f"{spec.name} {spec.formatting} {sorted(spec.columns.items(), key=str)} {sorted(spec.tags.items())}".encode()
        )
        h.update(sha256_file(spec.path).encode())
    for path in sorted(image_paths):
        st = os.stat(path)
        h.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(processor_files_digest(config.model).encode())
    h.update(
        f"{template.SYSTEM_FORMAT}{template.USER_FORMAT}{template.ASSISTANT_FORMAT}{template.DEFAULT_SYSTEM}".encode()
    )
    opts = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("out", "num_proc", "force", "quiet", "dataset_dir")
    }
    h.update(json.dumps(opts, sort_keys=True).encode())
    return h.hexdigest()


def _scan(specs: list[DatasetSpec], options: ReadOptions) -> tuple[int, set[str]]:
    """First, cheap pass: row count (for the progress bar) and the image files the rows use."""
    rows, images = 0, set()
    for item in iter_records(specs, options):
        rows += 1
        if isinstance(item, dict):
            images.update(item["images"])
    return rows, images


def _processor_summary(config: BuildConfig, tokenizer, image_processor) -> dict:
    from qvl_data.processor import processor_files_digest

    size = image_processor.size
    return {
        "model": config.model or "embedded",
        "digest": processor_files_digest(config.model),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "image_mean": [float(x) for x in image_processor.image_mean],
        "image_std": [float(x) for x in image_processor.image_std],
        "rescale_factor": float(image_processor.rescale_factor),
        "patch_size": int(image_processor.patch_size),
        "temporal_patch_size": int(image_processor.temporal_patch_size),
        "merge_size": int(image_processor.merge_size),
        "min_pixels": int(size["shortest_edge"]),
        "max_pixels": int(size["longest_edge"]),
    }


def _clean_output(out_dir: Path) -> None:
    """Remove what an earlier (possibly killed) build left; the manifest first, so nothing reads a mix."""
    for name in (shards.MANIFEST, shards.MANIFEST + ".tmp", shards.REJECTED, shards.REJECTED + ".tmp"):
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / shards.SHARD_DIR).is_dir():
        shutil.rmtree(out_dir / shards.SHARD_DIR)


def _progress(total: int, quiet: bool, label: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RowsPerSecond(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[override]
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:,.0f} rows/s"

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )
    return progress, progress.add_task(label, total=total)


def run_pipeline(
    config: BuildConfig,
    write: bool = True,
    on_rejection: Callable[[Rejection], None] | None = None,
    label: str = "building",
) -> BuildResult:
    """Encode every row; with ``write`` produce shards + manifest, else only validate and report."""
    started = time.perf_counter()
    dataset_dir = resolve_dataset_dir(config)
    specs = resolve_datasets(dataset_dir, config.dataset_names)
    ropts = read_options(config, dataset_dir)
    eopts = encode_options(config)
    total_rows, image_paths = _scan(specs, ropts)

    out_dir = Path(config.out)
    fp = fingerprint(specs, dataset_dir, image_paths, config)
    if write and not config.force and (out_dir / shards.MANIFEST).is_file():
        try:
            existing = shards.load_manifest(out_dir)
        except QvlError:
            existing = {}
        if existing.get("fingerprint") == fp:
            return BuildResult(out_dir=out_dir, manifest=existing, skipped=True)

    sources = {spec.name: SourceTotals() for spec in specs}
    reasons: Counter[str] = Counter()
    writer = rejected_file = None
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean_output(out_dir)
        writer = shards.ShardWriter(out_dir, config.pixel_format, max_shard_bytes=config.shard_size_mb << 20)
        rejected_file = open(out_dir / (shards.REJECTED + ".tmp"), "w", encoding="utf-8")

    progress, task = _progress(total_rows, config.quiet, label)
    try:
        # The pool loads the processor in this process first (the manifest reads it; forks inherit it).
        with worker_pool(config.workers, (config.model, eopts)) as pool, progress:
            for result in ordered_map(pool, _encode_items, iter_records(specs, ropts), 2 * config.workers):
                progress.advance(task)
                if isinstance(result, Rejection):
                    sources[result.source].rejected += 1
                    reasons[result.reason] += 1
                    if rejected_file:
                        rejected_file.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
                    if on_rejection:
                        on_rejection(result)
                    continue
                totals = sources[result.source]
                totals.rows += 1
                totals.tokens += len(result.input_ids)
                totals.trained_tokens += result.trained_tokens
                totals.image_tokens += result.image_tokens
                totals.images += len(result.image_paths)
                totals.max_length = max(totals.max_length, len(result.input_ids))
                totals.truncated += result.truncated
                if writer:
                    writer.write(result)
    finally:
        if rejected_file:
            rejected_file.close()

    manifest = {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "qvl_version": __version__,
        "fingerprint": fp,
        "dataset_dir": str(dataset_dir),
        "datasets": config.dataset_names,
        "options": {
            "cutoff_len": config.cutoff_len,
            "image_max_pixels": config.image_max_pixels,
            "image_min_pixels": config.image_min_pixels,
            "mask_history": config.mask_history,
            "pixel_format": config.pixel_format,
            "set_vars": list(config.set_vars),
            "template": "qwen2_vl",
        },
        "processor": _processor_summary(config, _WORKER["tokenizer"], _WORKER["image_processor"]),
        "input_rows": total_rows,
        "totals": _sum_totals(sources),
        "sources": {name: asdict(t) for name, t in sources.items()},
        "rejected": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        "shards": [],
    }
    if write:
        manifest["shards"] = [asdict(s) for s in writer.close()]
        os.replace(out_dir / (shards.REJECTED + ".tmp"), out_dir / shards.REJECTED)
        shards.write_json_atomic(out_dir / shards.MANIFEST, manifest)  # last: marks the build complete
    return BuildResult(out_dir, manifest, seconds=time.perf_counter() - started, sources=sources)


def _sum_totals(sources: dict[str, SourceTotals]) -> dict[str, int]:
    keys = ("rows", "tokens", "trained_tokens", "image_tokens", "images", "truncated", "rejected")
    totals = {k: sum(getattr(t, k) for t in sources.values()) for k in keys}
    totals["max_length"] = max((t.max_length for t in sources.values()), default=0)
    return totals


def build(config: BuildConfig) -> BuildResult:
    return run_pipeline(config, write=True)
