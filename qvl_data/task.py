"""The build's tasks. Each runs wherever an executor puts it (this process, a pool worker, a Ray node) and
touches only its own files; the driver (``qvl_data/build.py``) only plans, dispatches and commits.

* :func:`index_task`: index one dataset (``qvl_data/partition.py``).
* :func:`partition_task`: all the per-row work of one partition: read its rows, validate them (images
  included), decode and process images, tokenize, write its shard file(s) and its rejected rows, then its
  completion record, last and atomically. A partition whose record matches (same fingerprint, same rows,
  same image files, its files present) is reused as is.
* :func:`processor_task`: the processor facts the manifest records.

The processor is loaded once per process (:func:`processor`), on first use: a worker that only reuses
partitions never loads it, and a Ray worker keeps it across the tasks it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvl_data import vision
from qvl_data.encode import (
    EncodedRow,
    EncodeOptions,
    MeasuredImage,
    encode_record,
    measure_image,
    processor_summary,
)
from qvl_data.errors import QvlError
from qvl_data.format import QWEN2_VL_GEOMETRY, PartitionEntry, PatchGeometry, SourceTotals
from qvl_data.image_store import (
    ImageTaskResult,
    bytes_key,
    files_identity,
    process_bucket,
    read_key_cache,
    request_buckets,
    write_key_cache,
    write_requests,
)
from qvl_data.partition import DatasetIndex, Partition, index_dataset
from qvl_data.schema import EmbeddedImage, Rejection, rejection_line
from qvl_data.shards import (
    SHARD_DIR,
    SHARD_NAME,
    ShardWriter,
    shard_prefix,
    shard_problem,
    write_json_atomic,
)
from qvl_data.sources import DatasetSpec, ReadOptions, convert_partition

# Workers may be forked from a process that used the tokenizer: keep its Rust thread pool out of them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARTS_DIR = "parts"  # completion records and rejected rows, per partition, in the work directory
STAGED_DIR = "staged"  # JSON arrays staged as JSON Lines


@dataclass(frozen=True)
class BuildContext:
    """Everything a task needs besides its partition; the same for every task of a build."""

    out_dir: str
    work_dir: str
    fingerprint: str
    model: str | None
    encode: EncodeOptions
    read: ReadOptions
    specs: tuple[DatasetSpec, ...]
    shard_bytes: int
    write: bool = True  # False: validate only; rejections come back in the result, nothing is written
    geometry: PatchGeometry = QWEN2_VL_GEOMETRY  # the family's: the shards' pixel column width
    image_store: str = ""  # the image store's folder (its key cache; the image tasks get their own folder)

    def spec(self, source: str) -> DatasetSpec:
        return next(s for s in self.specs if s.name == source)


@dataclass
class TaskResult:
    entry: PartitionEntry
    reused: bool = False
    cpu_seconds: float = 0.0  # this task's CPU time (not part of any written byte)
    loaded_processor: bool = False  # this task loaded the processor into its process first
    rejections: list[Rejection] = field(default_factory=list)  # validate mode only
    damaged: str = ""  # why this partition was redone: a shard its record lists is damaged (or "")
    buckets: list[int] = field(default_factory=list)  # the image-store buckets its image requests touch
    failed_known: list[str] = field(default_factory=list)  # the undecodable image keys it was built with


_PROCESSOR: dict[str, Any] = {}


def processor(model: str | None) -> tuple[Any, Any]:
    """(tokenizer, image processor) for ``model``, loaded once per process."""
    if _PROCESSOR.get("model", ()) != model:
        from qvl_data.processor import load_image_processor, load_tokenizer

        _PROCESSOR.update(model=model, tokenizer=load_tokenizer(model), image=load_image_processor(model))
        _PROCESSOR["loads"] = _PROCESSOR.get("loads", 0) + 1  # how often this process loaded one
    return _PROCESSOR["tokenizer"], _PROCESSOR["image"]


def processor_task(model: str | None) -> dict[str, Any]:
    """The processor facts the manifest records (:func:`qvl_data.encode.processor_summary`), as a dict."""
    return asdict(processor_summary(model, *processor(model)))


def index_task(ctx: BuildContext, source: str, partition_rows_option: int) -> DatasetIndex:
    stage_dir = Path(ctx.work_dir) / STAGED_DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    return index_dataset(source, str(ctx.spec(source).path), partition_rows_option, str(stage_dir))


def record_path(ctx: BuildContext, index: int) -> Path:
    return Path(ctx.work_dir) / PARTS_DIR / f"{index:05d}.json"


def rejected_path(ctx: BuildContext, index: int) -> Path:
    return rejected_file(ctx.work_dir, index)


def rejected_file(work_dir: str | Path, index: int) -> Path:
    """Partition ``index``'s rejected rows in the work directory ``work_dir``."""
    return Path(work_dir) / PARTS_DIR / f"{index:05d}.rejected.jsonl"


def requests_path(ctx: BuildContext, index: int) -> Path:
    """The partition's image requests (key and source of every image its rows use), for the image tasks."""
    return Path(ctx.work_dir) / PARTS_DIR / f"{index:05d}.images.arrow"


def _convert(ctx: BuildContext, partition: Partition) -> tuple[list, str]:
    """The partition's rows as records or rejections (structural checks, image paths resolved), and a
    digest of that outcome together with each image's (path, size, mtime): equal digests mean the
    encoded output would be equal too."""
    items, digest = [], hashlib.sha256()
    for item in convert_partition(ctx.spec(partition.source), partition, ctx.read):
        if isinstance(item, Rejection):
            digest.update(f"{item.index} rejected {item.reason} {item.message}\n".encode("utf-8", "replace"))
        else:
            for path in item["images"]:
                if isinstance(path, EmbeddedImage):  # by content: the same digest as its store key
                    line = f"{item['index']} embedded {path.name} {bytes_key(path.data)}\n"
                else:
                    st = os.stat(path)
                    line = f"{item['index']} {path} {st.st_size} {st.st_mtime_ns}\n"
                digest.update(line.encode("utf-8", "replace"))
        items.append(item)
    return items, digest.hexdigest()


def _reusable(
    ctx: BuildContext,
    partition: Partition,
    image_digest: str,
    known: PartitionEntry | None,
    check_only: bool = False,
) -> tuple[PartitionEntry | None, str]:
    """(the partition's completion record, "") if it still describes what this task would write, else
    (None, why a shard it lists is damaged, or ""). A missing or damaged record (a crash, a full disk, a
    stray edit) means "redo this partition", unless ``known`` (the entry of a complete build's manifest
    with this fingerprint) still matches its files: then that entry is the record, written back, and the
    complete build stays complete. A record without its image request file is reused only by the check
    of a complete build (``check_only``: no image task runs then, so no request is read); the image
    tasks of a build that redoes any partition need every partition's requests."""
    has_requests = check_only or requests_path(ctx, partition.index).is_file()
    entry = _read_record(ctx, partition)
    if entry is not None and not has_requests:
        entry = None
    if entry is None and known is not None and _same_rows(known, partition) and has_requests:
        entry = known
        if ctx.write:
            _write_record(ctx, partition, entry)
    if (
        entry is None
        or entry.image_digest != image_digest
        or not rejected_path(ctx, partition.index).is_file()
    ):
        return None, ""
    for shard in entry.shards:
        problem = shard_problem(Path(ctx.out_dir) / shard.file, shard, ctx.encode.pixel_format, ctx.geometry)
        if problem is not None:
            return None, problem
    return entry, ""


def _read_record(ctx: BuildContext, partition: Partition) -> PartitionEntry | None:
    try:
        record = json.loads(record_path(ctx, partition.index).read_text(encoding="utf-8"))
        if record["fingerprint"] != ctx.fingerprint or record["partition"] != _partition_json(ctx, partition):
            return None
        return PartitionEntry.from_dict(record["entry"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent or damaged: redo
        return None


def _same_rows(entry: PartitionEntry, partition: Partition) -> bool:
    return (entry.index, entry.source, entry.file, entry.first_row, entry.rows) == (
        partition.index,
        partition.source,
        partition.file,
        partition.first_row,
        partition.rows,
    )


def _write_record(
    ctx: BuildContext, partition: Partition, entry: PartitionEntry, images: dict | None = None
) -> None:
    record = {
        "fingerprint": ctx.fingerprint,
        "partition": _partition_json(ctx, partition),
        "entry": asdict(entry),
        # the image-store buckets its requests touch, and the undecodable images its rows were told of
        "images": images if images is not None else _record_images(ctx, partition),
    }
    write_json_atomic(record_path(ctx, partition.index), record)


def _record_images(ctx: BuildContext, partition: Partition) -> dict:
    try:
        images = json.loads(record_path(ctx, partition.index).read_text(encoding="utf-8"))["images"]
        return {"buckets": list(images["buckets"]), "failed": list(images["failed"])}
    except (OSError, ValueError, KeyError, TypeError):  # a record rebuilt from the manifest's entry
        path = requests_path(ctx, partition.index)
        return {"buckets": request_buckets(path) if path.is_file() else [], "failed": []}


def _partition_json(ctx: BuildContext, partition: Partition) -> dict[str, Any]:
    """The partition as its record stores it: tuples as lists (as read back), and its staged row file
    relative to the work directory, so that a build folder moved elsewhere still matches."""
    return portable_partition(json.loads(json.dumps(asdict(partition))), ctx.work_dir)


def portable_partition(fields: dict[str, Any], work_dir: str | Path) -> dict[str, Any]:
    """Partition fields with a ``row_file`` inside ``work_dir`` (a staged JSON array) made relative to it."""
    row_file = Path(fields["row_file"])
    if row_file.is_absolute() and row_file.is_relative_to(work_dir):
        return {**fields, "row_file": row_file.relative_to(work_dir).as_posix()}
    return fields


def local_partition(fields: dict[str, Any], work_dir: str | Path) -> dict[str, Any]:
    """The inverse of :func:`portable_partition` for this run's ``work_dir``."""
    if Path(fields["row_file"]).is_absolute():
        return fields
    return {**fields, "row_file": str(Path(work_dir) / fields["row_file"])}


def _remove_outputs(ctx: BuildContext, index: int) -> None:
    """Whatever an earlier run of this partition of this build left: its record first, then its shards
    (the files this task is about to write, under the names only it uses; a previous build's shards have
    another fingerprint in their names and stay until this build commits)."""
    record_path(ctx, index).unlink(missing_ok=True)
    requests_path(ctx, index).unlink(missing_ok=True)
    for file in (Path(ctx.out_dir) / SHARD_DIR).glob(f"{shard_prefix(ctx.fingerprint, index)}-*.arrow*"):
        if SHARD_NAME.fullmatch(file.name):
            file.unlink()


def partition_task(
    ctx: BuildContext,
    partition: Partition,
    check_only: bool = False,
    known: PartitionEntry | None = None,
    failed: dict[str, tuple[str, str]] | None = None,
) -> TaskResult:
    """Encode and write one partition, or reuse its valid completion record (or ``known``, see
    :func:`_reusable`). With ``check_only`` no shard is written: the result only says whether the
    partition is still valid (``reused``).

    A build's rows get their images' keys, sizes and grids from the image headers (no pixel is decoded
    here); the images go to the partition's request file for the image tasks. ``failed``: the images of
    this partition that the image tasks could not decode (key -> code, message); the rows using them are
    rejected as a build that decoded them here would have (None: none known yet, any record is reused)."""
    started = time.process_time()
    items, image_digest = _convert(ctx, partition)
    damaged = ""
    if ctx.write or check_only:
        entry, damaged = _reusable(ctx, partition, image_digest, known, check_only)
        images = _record_images(ctx, partition) if entry is not None else {}
        if entry is not None and (failed is None or sorted(failed) == images["failed"]):
            cpu = time.process_time() - started
            return TaskResult(entry, True, cpu, buckets=images["buckets"], failed_known=images["failed"])
        if check_only:
            return TaskResult(_entry(partition, image_digest, SourceTotals(), {}, []), damaged=damaged)
        _remove_outputs(ctx, partition.index)

    totals, reasons, rejections = SourceTotals(), {}, []
    writer = None
    if ctx.write:
        writer = ShardWriter(
            Path(ctx.out_dir),
            ctx.encode.pixel_format,
            ctx.shard_bytes,
            prefix=shard_prefix(ctx.fingerprint, partition.index),
            geometry=ctx.geometry,
        )
    tokenizer = image_processor = None
    loads = _PROCESSOR.get("loads", 0)
    requests: dict = {}
    files = [p for item in items if isinstance(item, dict) for p in item["images"] if isinstance(p, str)]
    identity = files_identity(files) if ctx.write and ctx.image_store else ""
    cache = read_key_cache(Path(ctx.image_store), identity) if identity else {}
    measured_now: dict = {}
    for item in items:
        if isinstance(item, dict):
            if tokenizer is None:
                tokenizer, image_processor = processor(ctx.model)
                _check_geometry(ctx, image_processor)
            measured = None
            if ctx.write:  # validate decodes every image itself: no store to hand them to
                measured = _measure(
                    item["images"], image_processor, ctx.encode, requests, failed or {}, cache, measured_now
                )
            item = encode_record(
                item, tokenizer, image_processor, ctx.encode, file=partition.file, measured=measured
            )
        if isinstance(item, Rejection):
            rejections.append(item)
            reasons[item.reason] = reasons.get(item.reason, 0) + 1
            totals.rejected += 1
            continue
        _count(totals, item)
        if writer:
            writer.write(item)

    entry = _entry(partition, image_digest, totals, reasons, writer.close() if writer else [])
    loaded = _PROCESSOR.get("loads", 0) > loads
    if not ctx.write:
        cpu = time.process_time() - started
        return TaskResult(entry, cpu_seconds=cpu, loaded_processor=loaded, rejections=rejections)
    _write_rejected(rejected_path(ctx, partition.index), rejections)
    if identity and not cache:
        write_key_cache(Path(ctx.image_store), identity, measured_now)
    buckets = write_requests(requests_path(ctx, partition.index), requests)
    images = {"buckets": buckets, "failed": sorted(failed or {})}
    _write_record(ctx, partition, entry, images)  # last: marks the partition done
    cpu = time.process_time() - started
    return TaskResult(
        entry,
        cpu_seconds=cpu,
        loaded_processor=loaded,
        damaged=damaged,
        buckets=buckets,
        failed_known=images["failed"],
    )


def _measure(
    sources: list,
    image_processor: Any,
    options: EncodeOptions,
    requests: dict,
    failed: dict,
    cache: dict,
    measured_now: dict,
) -> list[MeasuredImage | vision.ImageError]:
    """One row's images measured from their headers; each readable one requested from the store (those of
    a row rejected for another image too: which image a row's rejection names must not depend on where
    its images were decoded). ``cache``: the key cache's (key, size) per unchanged file; what is measured
    goes to ``measured_now`` (also reused by the partition's later rows of the same file)."""
    measured: list[MeasuredImage | vision.ImageError] = []
    for source in sources:
        known = None
        if isinstance(source, str):
            known = cache.get(source) or measured_now.get(source)
        key, image = measure_image(source, image_processor, options, known)
        if isinstance(image, MeasuredImage):
            if isinstance(source, str):
                measured_now[source] = (image.key, image.original_size)
            requests.setdefault(key, source)
            if key in failed:
                image = vision.ImageError(*failed[key])
        measured.append(image)
    return measured


def image_task(
    folder: str,
    bucket: int,
    requests: list[tuple[int, str]],
    model: str | None,
    options: EncodeOptions,
    force: bool = False,
    max_shard_bytes: int = 256 << 20,
) -> ImageTaskResult:
    """One bucket of the image store (qvl_data/image_store.py :func:`process_bucket`), the processor
    loaded once per process when an image is to be processed."""
    return process_bucket(
        folder,
        bucket,
        requests,
        lambda: processor(model)[1],
        options.pixel_format,
        options.image_max_pixels,
        options.image_min_pixels,
        options.max_decode_pixels,
        force,
        max_shard_bytes,
    )


def _check_geometry(ctx: BuildContext, image_processor: Any) -> None:
    """The processor's patch geometry is its family's (the shards' pixel column width); one line if not."""
    got = PatchGeometry(
        int(image_processor.patch_size),
        int(image_processor.temporal_patch_size),
        int(image_processor.merge_size),
    )
    if got != ctx.geometry:
        raise QvlError(
            f"--model {ctx.model}: its preprocessor_config.json has patch_size {got.patch_size}, merge_size "
            f"{got.merge_size}, temporal_patch_size {got.temporal_patch_size}, but its model family has "
            f"{ctx.geometry.patch_size}, {ctx.geometry.merge_size}, {ctx.geometry.temporal_patch_size} "
            "(config.json model_type); use a checkpoint whose files agree"
        )


def _entry(
    partition: Partition, image_digest: str, totals: SourceTotals, reasons: dict, shards: list
) -> PartitionEntry:
    return PartitionEntry(
        index=partition.index,
        source=partition.source,
        file=partition.file,
        first_row=partition.first_row,
        rows=partition.rows,
        image_digest=image_digest,
        totals=totals,
        rejected_by_reason=dict(sorted(reasons.items())),
        shards=shards,
    )


def _count(totals: SourceTotals, row: EncodedRow) -> None:
    totals.rows += 1
    totals.tokens += len(row.input_ids)
    totals.trained_tokens += row.trained_tokens
    totals.image_tokens += row.image_tokens
    totals.images += len(row.image_paths)
    totals.max_length = max(totals.max_length, len(row.input_ids))
    totals.truncated += row.truncated


def _write_rejected(path: Path, rejections: list[Rejection]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(rejection_line(r) for r in rejections)
    os.replace(tmp, path)
