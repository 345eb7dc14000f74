"""The build driver: plan -> dispatch -> commit.

1. **Plan.** Fingerprint the inputs and options, index every dataset (one task each, see
   ``qvl_data/partition.py``) and cut the rows into partitions: a pure function of the inputs and the
   output-changing options, never of ``--num-proc`` or the executor.
2. **Dispatch.** One task per partition (``qvl_data/task.py``) on the chosen executor
   (``qvl_data/executors.py``); each writes its own shard files, rejected rows and completion record.
3. **Commit.** From the small completion records: ``rejected.jsonl`` (the partitions' rejected rows in
   order) and, last, ``manifest.json``.

The driver reads no image, tokenizes nothing and never holds pixels: per row it does nothing at all, so it
can feed as many workers as a machine or a Ray cluster has. A build killed at any point and re-run with the
same inputs and options redoes only the partitions without a valid completion record (the work directory
``<out>/.qvl-build`` keeps them), and ends byte-identical to a clean build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from qvl_data import __version__, shards, template
from qvl_data.config import BuildConfig
from qvl_data.encode import EncodeOptions
from qvl_data.errors import QvlError
from qvl_data.executors import InProcess, open_executor
from qvl_data.format import (
    FORMAT_VERSION,
    BuildOptions,
    Manifest,
    PartitionEntry,
    ProcessorSummary,
    Rejected,
    SourceTotals,
)
from qvl_data.partition import DatasetIndex, Partition, data_files, make_plan
from qvl_data.progress import rows_progress
from qvl_data.schema import Rejection
from qvl_data.sources import DatasetSpec, ReadOptions, resolve_datasets
from qvl_data.task import (
    PARTS_DIR,
    BuildContext,
    TaskResult,
    index_task,
    partition_task,
    processor,
    processor_task,
    rejected_path,
)

WORK_DIR = ".qvl-build"  # in the output directory: staged inputs, indexes, completion records
#: Libraries whose versions change the bytes of a build: the resize (Pillow), the processor and
#: tokenizer code (transformers, tokenizers), array maths (numpy). A new version rebuilds.
BYTE_DECIDING_LIBRARIES = ("pillow", "transformers", "tokenizers", "numpy")


@dataclass
class BuildResult:
    out_dir: Path
    manifest: Manifest
    skipped: bool = False  # True when the fingerprint matched and nothing was done
    seconds: float = 0.0
    sources: dict[str, SourceTotals] = field(default_factory=dict)
    partitions: int = 0
    reused: int = 0  # partitions whose completion record was still valid
    processor_loads: int = 0  # partition tasks that had to load the processor first (0 once warmed up)
    driver_cpu_seconds: float = 0.0  # CPU of this process, not counting tasks run in it
    task_cpu_seconds: float = 0.0  # CPU of all the tasks, wherever they ran


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
        media_dir=Path(config.media_dir).resolve() if config.media_dir else None,
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


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`BYTE_DECIDING_LIBRARIES` (read from metadata, nothing imported)."""
    versions = {}
    for name in BYTE_DECIDING_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def build_options(config: BuildConfig) -> BuildOptions:
    return BuildOptions(
        cutoff_len=config.cutoff_len,
        image_max_pixels=config.image_max_pixels,
        image_min_pixels=config.image_min_pixels,
        mask_history=config.mask_history,
        pixel_format=config.pixel_format,
        set_vars=list(config.set_vars),
        partition_rows=config.partition_rows,
    )


def fingerprint(specs: list[DatasetSpec], dataset_dir: Path, config: BuildConfig, versions: dict) -> str:
    """Hash of everything the output depends on except the images: data files by content, processor files,
    template, output-changing options, library versions and qvl's version. Images are checked per
    partition by their tasks (path, size, mtime), so deciding "nothing to do" reads no image."""
    from qvl_data.files import sha256_file
    from qvl_data.processor import processor_files_digest

    h = hashlib.sha256()
    h.update(f"qvl {__version__} format {FORMAT_VERSION}\n".encode())
    h.update(sha256_file(dataset_dir / "dataset_info.json").encode())
    for spec in specs:
        h.update(
            f"{spec.name} {spec.formatting} {sorted(spec.columns.items(), key=str)} {sorted(spec.tags.items())}".encode()
        )
        for file in data_files(spec.path):
            h.update(f"{file.name} {sha256_file(file)}\n".encode())
    h.update(processor_files_digest(config.model).encode())
    h.update(
        f"{template.SYSTEM_FORMAT}{template.USER_FORMAT}{template.ASSISTANT_FORMAT}{template.DEFAULT_SYSTEM}".encode()
    )
    h.update(json.dumps(asdict(build_options(config)), sort_keys=True).encode())
    h.update(f"{config.media_dir} {config.allow_outside_images} {config.shard_size_mb}".encode())
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- progress


def _progress(total: int, quiet: bool, label: str, get_time: Callable[[], float] | None = None):
    """The build's bar over input rows: rows/s and images/s since the start."""
    return rows_progress(total, label, {"images": "img/s"}, quiet=quiet, get_time=get_time)


# ------------------------------------------------------------------------------------------- the work dir


def _wipe(out_dir: Path) -> None:
    """Remove every output of an earlier build; the manifest first, so nothing reads a mix."""
    for name in (shards.MANIFEST, shards.MANIFEST + ".tmp", shards.REJECTED, shards.REJECTED + ".tmp"):
        (out_dir / name).unlink(missing_ok=True)
    for name in (shards.SHARD_DIR, WORK_DIR):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def _prepare_out_dir(out_dir: Path, fp: str, force: bool) -> None:
    """Keep what an earlier run of the same build left (to resume it); anything else goes."""
    state = out_dir / WORK_DIR / "build.json"
    try:
        same = not force and json.loads(state.read_text())["fingerprint"] == fp
    except (OSError, ValueError, KeyError):
        same = False
    if not same:
        _wipe(out_dir)
    else:  # a killed run may have left half-written files; no task runs now
        for tmp in [*(out_dir / shards.SHARD_DIR).glob("*.tmp"), *(out_dir / WORK_DIR).rglob("*.tmp")]:
            tmp.unlink()
    (out_dir / WORK_DIR / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    shards.write_json_atomic(state, {"fingerprint": fp})


def _existing_manifest(out_dir: Path) -> Manifest | None:
    try:
        return shards.load_manifest(out_dir)
    except QvlError:
        return None


# ------------------------------------------------------------------------------------------- the driver


def _index(
    ctx: BuildContext, executor: Any, specs: list[DatasetSpec], config: BuildConfig, need_processor: bool
):
    """Phase 1: every dataset's index (cached in the work directory) and, if needed, the processor facts."""
    cache = Path(ctx.work_dir) / "index"
    cache.mkdir(parents=True, exist_ok=True)
    indexes: dict[str, DatasetIndex] = {}
    for spec in specs:
        path = cache / f"{spec.name}.json"
        if ctx.write and path.is_file():
            indexes[spec.name] = DatasetIndex(**json.loads(path.read_text()))
    calls: list = [(index_task, (ctx, s.name, config.partition_rows)) for s in specs if s.name not in indexes]
    if need_processor:
        # One processor task per worker that starts cold (Ray's), queued first so that they all load the
        # processor side by side now, instead of one here and each other in its first partition while
        # the rest wait. Their results are the same facts; one is kept.
        calls[:0] = [(processor_task, (config.model,))] * max(1, executor.cold_workers)
    summary = None
    for result in executor.map_unordered(calls):
        if isinstance(result, DatasetIndex):
            indexes[result.source] = result
            if ctx.write:
                shards.write_json_atomic(cache / f"{result.source}.json", asdict(result))
        else:
            summary = result
    return [indexes[s.name] for s in specs], summary


def run_pipeline(
    config: BuildConfig,
    write: bool = True,
    on_rejection: Callable[[Rejection], None] | None = None,
    label: str = "building",
) -> BuildResult:
    """Build (``write``) or only validate every row; returns the manifest and the run's figures."""
    from qvl_data.processor import check_model_source

    started, cpu_started = time.perf_counter(), time.process_time()
    check_model_source(config.model)
    # Absolute paths: tasks may run in other processes, other working directories, other machines.
    dataset_dir = resolve_dataset_dir(config).resolve()
    specs = resolve_datasets(dataset_dir, config.dataset_names)
    versions = library_versions()
    fp = fingerprint(specs, dataset_dir, config, versions)
    out_dir = Path(config.out).resolve()
    existing = _existing_manifest(out_dir) if write and not config.force else None
    if existing is not None and existing.fingerprint != fp:
        existing = None
    scratch = None
    if write:
        _prepare_out_dir(out_dir, fp, config.force)
        work_dir = out_dir / WORK_DIR
    else:
        scratch = tempfile.TemporaryDirectory(prefix="qvl-validate-")
        work_dir = Path(scratch.name)
    ctx = BuildContext(
        out_dir=str(out_dir),
        work_dir=str(work_dir),
        fingerprint=fp,
        model=config.model,
        encode=encode_options(config),
        read=read_options(config, dataset_dir),
        specs=tuple(specs),
        shard_bytes=config.shard_size_mb << 20,
        write=write,
    )
    if config.executor == "local" and existing is None:
        # Work ahead: load the processor here once, before the pool forks, so that every local worker
        # starts with it (importing transformers alone takes seconds per process). The driver still
        # tokenizes nothing; Ray workers load it themselves, once each.
        processor(config.model)
    try:
        with open_executor(config.executor, config.workers, config.ray_address) as executor:
            indexes, summary = _index(ctx, executor, specs, config, need_processor=existing is None)
            plan = make_plan(indexes)
            if existing is not None and _all_reusable(executor, ctx, plan):
                seconds = time.perf_counter() - started
                return BuildResult(Path(config.out), existing, True, seconds, partitions=len(plan))
            if write:
                (out_dir / shards.MANIFEST).unlink(missing_ok=True)  # shards are about to change
            results = _dispatch(executor, ctx, plan, sum(i.rows for i in indexes), config.quiet, label)
            in_process_cpu = sum(r.cpu_seconds for r in results) if isinstance(executor, InProcess) else 0.0
    finally:
        if scratch is not None:
            scratch.cleanup()

    entries = [r.entry for r in results]
    processor_summary = ProcessorSummary(**summary) if summary else existing.processor  # type: ignore[union-attr]
    manifest = _manifest(config, fp, dataset_dir, versions, processor_summary, indexes, entries)
    if write:
        _commit(out_dir, ctx, manifest, plan)
    elif on_rejection is not None:
        for result in results:
            for rejection in result.rejections:
                on_rejection(rejection)
    return BuildResult(
        out_dir=Path(config.out),
        manifest=manifest,
        seconds=time.perf_counter() - started,
        sources={name: _totals(entries, name) for name in config.dataset_names},
        partitions=len(plan),
        reused=sum(r.reused for r in results),
        processor_loads=sum(r.loaded_processor for r in results),
        driver_cpu_seconds=time.process_time() - cpu_started - in_process_cpu,
        task_cpu_seconds=sum(r.cpu_seconds for r in results),
    )


def _all_reusable(executor: Any, ctx: BuildContext, plan: list[Partition]) -> bool:
    """Whether every partition's completion record still holds (its tasks check, reading no image)."""
    calls = [(partition_task, (ctx, p, True)) for p in plan]
    return all(result.reused for result in executor.map_unordered(calls))


def _dispatch(
    executor: Any, ctx: BuildContext, plan: list[Partition], rows: int, quiet: bool, label: str
) -> list[TaskResult]:
    """Phase 2: run every partition task; results in partition order."""
    results: list[TaskResult | None] = [None] * len(plan)
    progress, bar = _progress(rows, quiet, label)
    images = 0
    with progress:
        for result in executor.map_unordered([(partition_task, (ctx, p)) for p in plan]):
            results[result.entry.index] = result
            images += result.entry.totals.images
            progress.update(bar, advance=result.entry.rows, images=images)
    return results  # type: ignore[return-value]


def _totals(entries: list[PartitionEntry], source: str | None = None) -> SourceTotals:
    totals = SourceTotals()
    for entry in entries:
        if source is None or entry.source == source:
            totals.add(entry.totals)
    return totals


def _manifest(
    config: BuildConfig,
    fp: str,
    dataset_dir: Path,
    versions: dict[str, str],
    processor: ProcessorSummary,
    indexes: list[DatasetIndex],
    entries: list[PartitionEntry],
) -> Manifest:
    reasons: dict[str, int] = {}
    for entry in entries:
        for reason, n in entry.rejected_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + n
    totals = _totals(entries)
    return Manifest(
        fingerprint=fp,
        qvl_version=__version__,
        dataset_dir=str(dataset_dir),
        datasets=config.dataset_names,
        options=build_options(config),
        processor=processor,
        versions=versions,
        input_rows=sum(i.rows for i in indexes),
        totals=totals,
        sources={name: _totals(entries, name) for name in config.dataset_names},
        rejected=Rejected(total=totals.rejected, by_reason=dict(sorted(reasons.items()))),
        shards=[shard for entry in entries for shard in entry.shards],
        partitions=entries,
    )


def _commit(out_dir: Path, ctx: BuildContext, manifest: Manifest, plan: list[Partition]) -> None:
    """rejected.jsonl (the partitions' files, in order, copied byte for byte), then the manifest, last."""
    tmp = out_dir / (shards.REJECTED + ".tmp")
    with open(tmp, "wb") as out:
        for partition in plan:
            with open(rejected_path(ctx, partition.index), "rb") as part:
                shutil.copyfileobj(part, out)
    os.replace(tmp, out_dir / shards.REJECTED)
    shards.write_json_atomic(out_dir / shards.MANIFEST, manifest.to_dict())  # last: marks the build complete


def build(config: BuildConfig) -> BuildResult:
    return run_pipeline(config, write=True)
