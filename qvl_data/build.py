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
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from qvl_data import __version__, shards
from qvl_data.config import BuildConfig
from qvl_data.encode import EncodeOptions
from qvl_data.errors import QvlError
from qvl_data.executors import InProcess, open_executor
from qvl_data.family import Family, chat_template, template_for
from qvl_data.files import environment_error, is_regular_file
from qvl_data.format import (
    FORMAT_VERSION,
    BuildOptions,
    Manifest,
    PartitionEntry,
    ProcessorSummary,
    Rejected,
    SourceTotals,
)
from qvl_data.image_store import (
    STORE_DIR,
    ImageTaskResult,
    config_id,
    image_shard_size_problem,
    pixel_config,
    prepare_store,
    register_build,
    section,
    store_path,
)
from qvl_data.lock import exclusive_lock
from qvl_data.options import output_options
from qvl_data.partition import DatasetIndex, Partition, data_files, make_plan
from qvl_data.progress import rows_progress
from qvl_data.schema import Rejection
from qvl_data.sources import DatasetSpec, ReadOptions, check_dataset_shape, resolve_datasets
from qvl_data.task import (
    PARTS_DIR,
    BuildContext,
    TaskResult,
    image_task,
    index_task,
    local_partition,
    partition_task,
    portable_partition,
    processor,
    processor_task,
    record_path,
    rejected_file,
    rejected_path,
    requests_path,
)

WORK_DIR = ".qvl-build"  # in the output directory: staged inputs, indexes, completion records
LOCK_FILE = "lock"  # in the work directory: held by the build writing the folder (pid and host inside)
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
    repaired: list[str] = field(default_factory=list)  # the damaged shards whose partitions were redone
    images: int = 0  # distinct images the rows asked for
    images_reused: int = 0  # of those, already in the image store


def encode_options(config: BuildConfig) -> EncodeOptions:
    """The task's encoding options: the BuildConfig fields of the same names, the template resolved."""
    values = {f.name: getattr(config, f.name) for f in fields(EncodeOptions) if hasattr(config, f.name)}
    values["template"] = build_template(config)
    return EncodeOptions(**values)


def build_family(config: BuildConfig) -> Family:
    """The model family of the build: ``--model``'s (qvl_data/processor.py :func:`model_family`)."""
    from qvl_data.processor import model_family

    return model_family(config.model)


def build_template(config: BuildConfig) -> str:
    """``--template`` when given, else the family's default template."""
    return template_for(build_family(config), config.template).name


def read_options(config: BuildConfig, dataset_dir: Path) -> ReadOptions:
    options = build_options(config)
    return ReadOptions(
        dataset_dir=dataset_dir,
        media_dir=Path(options.media_dir) if options.media_dir else None,
        allow_outside_images=config.allow_outside_images,
        set_vars=tuple(tuple(item.split("=", 1)) for item in config.set_vars),  # type: ignore[arg-type]
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
    """The BuildConfig fields declared ``output="option"``: what the fingerprint hashes and the manifest
    records under ``options`` (one set, so the manifest shows exactly what decided the bytes)."""
    values = {name: getattr(config, name) for name in output_options(BuildConfig)}
    values["set_vars"] = list(values["set_vars"])
    family = build_family(config)
    values["family"] = family.name
    values["template"] = template_for(family, config.template).name
    # where the images are, not how this run spelled it (a relative path names another folder elsewhere)
    values["media_dir"] = str(Path(config.media_dir).resolve()) if config.media_dir else None
    return BuildOptions(**values)


def fingerprint(specs: list[DatasetSpec], dataset_dir: Path, config: BuildConfig, versions: dict) -> str:
    """Hash of everything the output depends on except the images: data files by content, processor files,
    template, :func:`build_options` (as the manifest records them), library versions and qvl's version.
    Images are checked per partition by their tasks (path, size, mtime), so deciding "nothing to do" reads
    no image."""
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
    # the template's definition (its strings and think rules), not only its name
    h.update(json.dumps(asdict(chat_template(build_template(config))), sort_keys=True).encode())
    h.update(json.dumps(asdict(build_options(config)), sort_keys=True).encode())
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- progress


def _progress(total: int, quiet: bool, label: str, get_time: Callable[[], float] | None = None):
    """The build's bar over input rows: rows/s and images/s since the start."""
    return rows_progress(total, label, {"images": "img/s"}, quiet=quiet, get_time=get_time)


# ------------------------------------------------------------------------------------------- the work dir
#
# What a build may remove in --out: only what a qvl build wrote there. A folder is a qvl build folder when
# it holds a qvl manifest or the work directory; a folder that holds a foreign manifest.json, or a
# rejected.jsonl or shard files without being a qvl build folder, is refused. Inside a qvl build folder a
# build with another fingerprint keeps the previous complete build (its manifest, rejected.jsonl and the
# shards the manifest lists) readable until its own manifest replaces it: its shard names carry its own
# fingerprint (shards.shard_prefix), so they never collide with the previous build's. At its start it
# removes only the work directory (but its lock) and the shards of the unfinished build the work
# directory was for (those its completion records list or that carry its fingerprint); after its commit,
# the shards the previous manifest listed. Only ``--force`` of the same build (same names) removes the
# previous build at the start, the manifest first. Any other file stays. Back to the previous build's
# inputs and options after a killed rebuild, its per-partition files are restored from its manifest and
# rejected.jsonl (:func:`_restore_rejected_parts`): it is up to date at once.

REPLACED = "replaced.json"  # in the work directory: the previous build's shards, while a commit removes them


def _read_qvl_manifest(path: Path) -> dict | None:
    """The manifest at ``path`` as JSON if it is a qvl manifest (any format version), else None."""
    if not is_regular_file(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == shards.FORMAT_NAME else None


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, in one line, an ``--out`` qvl cannot build into without destroying what it did not write."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise QvlError(f"{out_dir}: --out is a file, not a folder; choose a folder (a new one is created)")
    manifest = out_dir / shards.MANIFEST
    if os.path.lexists(manifest) and _read_qvl_manifest(manifest) is None:
        raise QvlError(
            f"{manifest}: not a qvl manifest, and qvl never deletes what it did not write: choose another "
            "--out (a new or empty folder, or an earlier qvl build)"
        )
    if os.path.lexists(manifest) or (out_dir / WORK_DIR).is_dir():
        return  # a qvl build folder
    shard_dir = out_dir / shards.SHARD_DIR
    foreign = [shards.REJECTED] if os.path.lexists(out_dir / shards.REJECTED) else []
    if os.path.lexists(shard_dir) and (not shard_dir.is_dir() or any(shard_dir.iterdir())):
        foreign.append(shards.SHARD_DIR + "/")
    if foreign:
        raise QvlError(
            f"{out_dir}: holds {' and '.join(foreign)} that no qvl build wrote (there is no qvl manifest), "
            "and qvl never deletes what it did not write: choose another --out"
        )


def _shard_files(entries: Any) -> set[str]:
    """The ``file`` of each shard entry in a manifest's or record's (unchecked) JSON list."""
    if not isinstance(entries, list):
        return set()
    return {s["file"] for s in entries if isinstance(s, dict) and isinstance(s.get("file"), str)}


def _manifest_shards(out_dir: Path) -> set[str]:
    """The shard files (relative names) that the complete build's manifest lists."""
    return _shard_files((_read_qvl_manifest(out_dir / shards.MANIFEST) or {}).get("shards"))


def _listed_shards(out_dir: Path) -> set[str]:
    """The shard files (relative names) of the build the work directory is for: those its completion
    records list, and those named with its fingerprint (a task killed before writing its record)."""
    names = set()
    for record in sorted((out_dir / WORK_DIR / PARTS_DIR).glob("*.json")):
        names |= _shard_files(_record_shards(record))
    fp = _work_fingerprint(out_dir)
    if fp is not None:
        for file in (out_dir / shards.SHARD_DIR).glob(f"{shards.shard_prefix(fp)}-*"):
            names.add(f"{shards.SHARD_DIR}/{file.name}")
    return names


def _record_shards(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["entry"]["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _work_fingerprint(out_dir: Path) -> str | None:
    """The fingerprint of the build the work directory is for (``build.json``), None if absent or damaged."""
    try:
        fp = json.loads((out_dir / WORK_DIR / "build.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fp if isinstance(fp, str) and len(fp) == 64 else None


def _remove_shards(out_dir: Path, names: set[str]) -> None:
    """Remove these shard files (relative names) and their ``.tmp``, only qvl's names inside ``shards/``."""
    shard_dir = (out_dir / shards.SHARD_DIR).resolve()
    for name in sorted(names):
        file = (out_dir / name).resolve()
        if file.parent == shard_dir and shards.SHARD_NAME.fullmatch(file.name):  # never outside shards/
            file.unlink(missing_ok=True)
            file.with_name(file.name + ".tmp").unlink(missing_ok=True)


def _wipe(out_dir: Path, keep_build: bool) -> None:
    """Remove the work directory's unfinished build (its shards, then the work directory but its lock)
    and, unless ``keep_build``, the complete build too (the manifest first, so nothing reads a mix)."""
    listed, kept = _listed_shards(out_dir), _manifest_shards(out_dir) if keep_build else set()
    if not keep_build:
        listed |= _manifest_shards(out_dir)
        (out_dir / shards.MANIFEST).unlink(missing_ok=True)
        (out_dir / shards.REJECTED).unlink(missing_ok=True)
    for name in (shards.MANIFEST + ".tmp", shards.REJECTED + ".tmp"):
        (out_dir / name).unlink(missing_ok=True)
    _remove_shards(out_dir, listed - kept)  # the complete build's records list its shards too: they stay
    work_dir = out_dir / WORK_DIR
    for item in work_dir.iterdir() if work_dir.is_dir() else ():
        if item.name != LOCK_FILE:  # held by this run
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()


def _finish_replace(out_dir: Path) -> None:
    """A commit killed after its manifest replaced the previous one: remove the previous build's shards
    that :data:`REPLACED` lists and the new manifest does not."""
    path = out_dir / WORK_DIR / REPLACED
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(names, list):
        _remove_shards(out_dir, {n for n in names if isinstance(n, str)} - _manifest_shards(out_dir))
    path.unlink()


def _restore_rejected_parts(out_dir: Path) -> None:
    """The complete build's per-partition rejected rows, split back out of rejected.jsonl (their files
    concatenated in partition order, one line per rejected row, as many as each manifest entry counts),
    so that its manifest's entries stand in for the records a killed rebuild removed and nothing is redone.
    If they do not add up, nothing is written: then every partition is redone."""
    manifest = _read_qvl_manifest(out_dir / shards.MANIFEST) or {}
    try:
        data = (out_dir / shards.REJECTED).read_bytes()
        counts = [(int(p["index"]), int(p["totals"]["rejected"])) for p in manifest["partitions"]]
    except (OSError, KeyError, TypeError, ValueError):
        return
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
    if (data and not data.endswith(b"\n")) or sum(n for _, n in counts) != len(lines):
        return
    start = 0
    for index, n in counts:
        path = rejected_file(out_dir / WORK_DIR, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(lines[start : start + n]))
        start += n


def _prepare_out_dir(out_dir: Path, fp: str, force: bool, complete: bool) -> None:
    """Keep what an earlier run of the same build left (to resume it), and the previous complete build
    until this one commits; the rest of qvl's outputs go. ``complete``: the folder holds a complete build
    with this fingerprint. The caller checked the folder (:func:`_check_out_dir`) and holds its lock."""
    _finish_replace(out_dir)
    work_fp = _work_fingerprint(out_dir)
    if not force and work_fp == fp:  # resume this build; a killed run may have left half-written files
        shard_tmps = [
            p for p in (out_dir / shards.SHARD_DIR).glob("*.tmp") if shards.SHARD_NAME.fullmatch(p.name)
        ]
        for tmp in [*shard_tmps, *(out_dir / WORK_DIR).rglob("*.tmp")]:
            tmp.unlink()
    elif not force and complete:
        # This build is the complete one; the work directory's records are kept (the manifest's entries
        # stand in for damaged ones) unless they are another build's unfinished ones (a killed rebuild).
        if work_fp is not None:
            _wipe(out_dir, keep_build=True)
            _restore_rejected_parts(out_dir)
    else:
        manifest_fp = (_read_qvl_manifest(out_dir / shards.MANIFEST) or {}).get("fingerprint")
        # --force of the same build writes the same names: the previous build cannot stay
        same_names = isinstance(manifest_fp, str) and manifest_fp[:8] == fp[:8]
        _wipe(out_dir, keep_build=not same_names)
    (out_dir / WORK_DIR / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    shards.write_json_atomic(out_dir / WORK_DIR / "build.json", {"fingerprint": fp})


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
            cached = _cached_index(path, ctx.work_dir)
            if cached is not None:
                indexes[spec.name] = cached
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
                data = asdict(result)
                data["partitions"] = [portable_partition(p, ctx.work_dir) for p in result.partitions]
                shards.write_json_atomic(cache / f"{result.source}.json", data)
        else:
            summary = result
    return [indexes[s.name] for s in specs], summary


def _cached_index(path: Path, work_dir: str) -> DatasetIndex | None:
    """A dataset's index as an earlier run of this build cached it; None when damaged (index it again)."""
    try:
        index = DatasetIndex(**json.loads(path.read_text(encoding="utf-8")))
        index.partitions[:] = [local_partition(p, work_dir) for p in index.partitions]
        make_plan([index])  # every partition has its fields
        return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def run_pipeline(
    config: BuildConfig,
    write: bool = True,
    on_rejection: Callable[[Rejection], None] | None = None,
    label: str = "building",
) -> BuildResult:
    """Build (``write``) or only validate every row; returns the manifest and the run's figures.

    A build holds the lock of ``--out`` throughout; an environment failure (permissions, a full disk) is
    one line naming the path, and Ctrl-C says that the same command resumes."""
    from qvl_data.processor import check_model_source

    check_model_source(config.model)
    if not write:
        with tempfile.TemporaryDirectory(prefix="qvl-validate-") as scratch:
            return _run(config, None, Path(scratch), on_rejection, label)
    out_dir = Path(config.out).resolve()
    try:
        _check_out_dir(out_dir)
        (out_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out_dir / WORK_DIR / LOCK_FILE, out_dir):
            return _run(config, out_dir, out_dir / WORK_DIR, on_rejection, label)
    except OSError as e:
        raise environment_error(e, out_dir) from None
    except KeyboardInterrupt:
        raise QvlError(
            f"{out_dir}: interrupted; re-run the same command to resume (finished partitions are kept)"
        ) from None


def _run(
    config: BuildConfig,
    out_dir: Path | None,
    work_dir: Path,
    on_rejection: Callable[[Rejection], None] | None,
    label: str,
) -> BuildResult:
    """:func:`run_pipeline` once the output folder is checked and locked (``out_dir`` None: validate)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    write = out_dir is not None
    # Absolute paths: tasks may run in other processes, other working directories, other machines.
    dataset_dir = resolve_dataset_dir(config).resolve()
    specs = resolve_datasets(dataset_dir, config.dataset_names)
    versions = library_versions()
    fp = fingerprint(specs, dataset_dir, config, versions)
    existing = _existing_manifest(out_dir) if write and not config.force else None
    store = image_store_dir(config, out_dir) if write else None
    if existing is not None and (existing.fingerprint != fp or not _same_store(existing, out_dir, store)):
        existing = None
    if write:
        _prepare_out_dir(out_dir, fp, config.force, complete=existing is not None)
    ctx = BuildContext(
        out_dir=str(out_dir or work_dir),
        work_dir=str(work_dir),
        fingerprint=fp,
        model=config.model,
        encode=encode_options(config),
        read=read_options(config, dataset_dir),
        specs=tuple(specs),
        shard_bytes=config.shard_size_mb << 20,
        write=write,
        geometry=build_family(config).geometry,
        image_store=str(store) if store is not None else "",
    )
    if config.executor == "local" and existing is None:
        # Work ahead: load the processor here once, before the pool forks, so that every local worker
        # starts with it (importing transformers alone takes seconds per process). The driver still
        # tokenizes nothing; Ray workers load it themselves, once each.
        processor(config.model)
    # A complete build's entries stand in for damaged completion records (see task._reusable).
    known = existing.partitions if existing is not None else []
    with open_executor(config.executor, config.workers, config.ray_address) as executor:
        indexes, summary = _index(ctx, executor, specs, config, need_processor=existing is None)
        for spec, index in zip(specs, indexes, strict=True):
            check_dataset_shape(spec, index)
        plan = make_plan(indexes)
        known_by_index = {entry.index: entry for entry in known}
        if existing is not None and _all_reusable(executor, ctx, plan, known_by_index):
            seconds = time.perf_counter() - started
            return BuildResult(Path(config.out), existing, True, seconds, partitions=len(plan))
        if existing is not None:  # a repair rewrites shards the manifest lists (another build's stay)
            (out_dir / shards.MANIFEST).unlink(missing_ok=True)
        processor_summary = ProcessorSummary(**summary) if summary else existing.processor  # type: ignore[union-attr]
        rows = sum(i.rows for i in indexes)
        results = _dispatch(executor, ctx, plan, known_by_index, rows, config.quiet, label)
        image_results: list[ImageTaskResult] = []
        if write:
            pixels = pixel_config(
                processor_summary,
                ctx.encode.pixel_format,
                ctx.encode.image_max_pixels,
                ctx.encode.image_min_pixels,
                ctx.encode.max_decode_pixels,
                build_family(config).name,
                versions,
            )
            folder = prepare_store(store, pixels)
            image_results = _image_phase(executor, ctx, plan, results, folder, config)
        in_process_cpu = sum(r.cpu_seconds for r in results) if isinstance(executor, InProcess) else 0.0
        if isinstance(executor, InProcess):
            in_process_cpu += sum(r.cpu_seconds for r in image_results)

    entries = [r.entry for r in results]
    manifest = _manifest(config, fp, dataset_dir, versions, processor_summary, indexes, entries)
    images = sum(r.needed for r in image_results)
    reused = images - sum(r.processed for r in image_results)
    if write:
        image_shards = [shard for r in image_results for shard in r.shards]
        manifest.image_store = section(store, out_dir, config_id(pixels), image_shards, images)
        _commit(out_dir, ctx, manifest, plan)
        register_build(store, out_dir / shards.MANIFEST)  # gc-images keeps what this build uses
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
        repaired=[r.damaged for r in results if r.damaged],
        images=images,
        images_reused=reused,
    )


def image_store_dir(config: BuildConfig, out_dir: Path) -> Path:
    """``--image-store``, or the store inside the build folder."""
    return Path(config.image_store).resolve() if config.image_store else out_dir / STORE_DIR


def _same_store(manifest: Manifest, out_dir: Path, store: Path) -> bool:
    """Whether a complete build's pixels are still where this run puts them: the same store, and every
    image shard it lists there at its size (one deleted or damaged is redone by the image phase)."""
    info = manifest.image_store
    if info is None or (out_dir / info.path).resolve() != store.resolve():
        return False
    folder = store_path(info, out_dir)
    return all(image_shard_size_problem(folder / s.file, s) is None for s in info.shards)


def _image_phase(
    executor: Any,
    ctx: BuildContext,
    plan: list[Partition],
    results: list[TaskResult],
    folder: Path,
    config: BuildConfig,
) -> list[ImageTaskResult]:
    """Phase 3: one image task per bucket the partitions' requests touch (in bucket order); then phase 4:
    the partitions whose rows use an image that could not be decoded are redone, told which (rare)."""
    requests: dict[int, list[tuple[int, str]]] = {}
    for result in results:
        for bucket in result.buckets:
            requests.setdefault(bucket, []).append(
                (result.entry.index, str(requests_path(ctx, result.entry.index)))
            )
    calls = [
        (image_task, (str(folder), b, requests[b], ctx.model, ctx.encode, config.force, ctx.shard_bytes))
        for b in sorted(requests)
    ]
    image_results = sorted(executor.map_unordered(calls), key=lambda r: r.bucket)
    failed_in: dict[int, dict[str, tuple[str, str]]] = {}
    for image_result in image_results:
        for key, partitions in image_result.failed_in.items():
            for index in partitions:
                failed_in.setdefault(index, {})[key] = image_result.failed[key]
    redo = [
        (partition_task, (ctx, p, False, None, failed_in.get(p.index, {})))
        for p in plan
        if sorted(failed_in.get(p.index, {})) != results[p.index].failed_known
    ]
    for result in executor.map_unordered(redo):
        results[result.entry.index] = result
    return image_results


def _all_reusable(
    executor: Any, ctx: BuildContext, plan: list[Partition], known: dict[int, PartitionEntry]
) -> bool:
    """Whether every partition's completion record still holds (its tasks check, reading no image)."""
    calls = [(partition_task, (ctx, p, True, known.get(p.index))) for p in plan]
    return all(result.reused for result in executor.map_unordered(calls))


def _dispatch(
    executor: Any,
    ctx: BuildContext,
    plan: list[Partition],
    known: dict[int, PartitionEntry],
    rows: int,
    quiet: bool,
    label: str,
) -> list[TaskResult]:
    """Phase 2: run every partition task; results in partition order."""
    results: list[TaskResult | None] = [None] * len(plan)
    progress, bar = _progress(rows, quiet, label)
    images = 0
    calls = [(partition_task, (ctx, p, False, known.get(p.index))) for p in plan]
    # said at the start (off a terminal too), not only in the summary: a resumed build is visibly one
    finished = sum(record_path(ctx, p.index).is_file() for p in plan) if ctx.write else 0
    if finished and not quiet:
        progress.console.print(
            f"resuming: {finished} of {len(plan)} partitions were finished by an earlier run (each is reused "
            "once its task has checked its images)",
            soft_wrap=True,
        )
    with progress:
        for result in executor.map_unordered(calls):
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
    """rejected.jsonl (the partitions' files, in order, copied byte for byte), then the manifest, last;
    then the previous build's shards that the new manifest does not list."""
    tmp = out_dir / (shards.REJECTED + ".tmp")
    with open(tmp, "wb") as out:
        for partition in plan:
            with open(rejected_path(ctx, partition.index), "rb") as part:
                shutil.copyfileobj(part, out)
    os.replace(tmp, out_dir / shards.REJECTED)
    # The previous build's shards go once the new manifest replaced its manifest (atomically); listed
    # first in the work directory, so that a run killed in between still removes them.
    replaced = _manifest_shards(out_dir) - {shard.file for shard in manifest.shards}
    if replaced:
        shards.write_json_atomic(Path(ctx.work_dir) / REPLACED, sorted(replaced))
    shards.write_json_atomic(out_dir / shards.MANIFEST, manifest.to_dict())  # last: marks the build complete
    _finish_replace(out_dir)


def build(config: BuildConfig) -> BuildResult:
    return run_pipeline(config, write=True)
