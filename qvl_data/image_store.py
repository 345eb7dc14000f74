"""The image store: each distinct image, processed once, in image shards of its own.

Layout (``<out>/images/`` by default, or ``--image-store DIR`` shared by several builds)::

    DIR/<config-id>/config.json           the options that decide an image's pixels (pixel_config)
    DIR/<config-id>/<bucket>/<sha>.arrow  image shards: Arrow IPC streams, named by their content's sha256
    DIR/builds/<id>.json                  the builds that use this store (for gc_images)

An entry's ``key`` is the sha256 of the image's bytes (a file's, or an embedded image's); ``bucket`` is the
key's first two hex digits, a fixed 256-way split of the store that gives each image task its own folder.
Row shards name their images by key (``image_keys``) and keep ``image_grid_thw`` and ``image_sizes``; the
manifest's ``image_store`` section lists the image shards its rows use.

Writing needs no lock, even into a store shared by builds running at once: a shard's name is the sha256 of
its bytes, which are a pure function of its entries, so two writers of one name write the same bytes, and
each publishes with an atomic rename of its own temporary file. A shard is never changed once published;
entries die with their whole shard (:func:`gc_images`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qvl_data.errors import QvlError
from qvl_data.files import atomic_file, write_json_atomic
from qvl_data.format import ImageShardEntry, ImageStoreSection, PatchGeometry, ProcessorSummary
from qvl_data.schema import EmbeddedImage, ImageSource

STORE_DIR = "images"  # the default store, inside the build folder
BUILDS_DIR = "builds"
KEYS_DIR = "keys"  # per partition's image files (path, size, mtime): their keys and header sizes
CONFIG_FILE = "config.json"
STORE_VERSION = 1
SHARD_FILE = re.compile(r"[0-9a-f]{64}\.arrow")
BUCKET = re.compile(r"[0-9a-f]{2}")
TMP_FILE = re.compile(r"\.[0-9a-f]{64}\.arrow\.tmp-\d+")
REQUEST_SCHEMA = pa.schema(
    [pa.field("key", pa.string()), pa.field("path", pa.string()), pa.field("data", pa.binary())]
)
_PIXEL_TYPE = {"uint8": pa.uint8(), "float32": pa.float32()}


def image_bytes(source: ImageSource) -> bytes:
    """The bytes of a record's image: the file's, or the embedded ones."""
    from qvl_data.vision import read_image_file

    return source.data if isinstance(source, EmbeddedImage) else read_image_file(source)


def image_key(source: ImageSource) -> str:
    """The store's key of an image: the sha256 (hex) of its bytes, wherever they came from."""
    return bytes_key(image_bytes(source))


def bytes_key(data: bytes) -> str:
    """:func:`image_key` of an image's bytes already read."""
    return hashlib.sha256(data).hexdigest()


def source_name(source: ImageSource) -> str:
    return source.name if isinstance(source, EmbeddedImage) else source


def bucket_of(key: str) -> int:
    return int(key[:2], 16)


# ------------------------------------------------------------------------------------------- config


def pixel_config(
    processor: ProcessorSummary,
    pixel_format: str,
    image_max_pixels: int,
    image_min_pixels: int,
    max_decode_pixels: int,
    family: str,
    versions: dict[str, str],
) -> dict[str, Any]:
    """Everything that decides an image's stored pixels (and nothing else: the text side is not here)."""
    return {
        "store_version": STORE_VERSION,
        "pixel_format": pixel_format,
        "image_max_pixels": image_max_pixels,
        "image_min_pixels": image_min_pixels,
        "max_decode_pixels": max_decode_pixels,
        "family": family,
        "patch_size": processor.patch_size,
        "temporal_patch_size": processor.temporal_patch_size,
        "merge_size": processor.merge_size,
        "image_mean": processor.image_mean,
        "image_std": processor.image_std,
        "rescale_factor": processor.rescale_factor,
        "min_pixels": processor.min_pixels,
        "max_pixels": processor.max_pixels,
        "versions": {k: versions.get(k, "absent") for k in ("pillow", "numpy", "transformers")},
    }


def config_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def prepare_store(store: Path, config: dict[str, Any]) -> Path:
    """The store's folder for ``config`` (created, its config.json written once); refuses a folder that
    holds something else under that name."""
    folder = Path(store) / config_id(config)
    path = folder / CONFIG_FILE
    if path.is_file():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(config))
        except (OSError, ValueError):
            same = False
        if not same:
            raise QvlError(f"{path}: not this build's pixel configuration; choose another --image-store")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, config)
    return folder


def store_path(section: ImageStoreSection, out_dir: Path) -> Path:
    """The config folder of a manifest's store (a relative path is relative to the build folder)."""
    return (Path(out_dir) / section.path / section.config_id).resolve()


# ------------------------------------------------------------------------------------------- key cache
#
# A text-side rebuild must not read and hash every image file again (hashing is most of its cost). Like a
# partition's completion record, which trusts an image file whose (path, size, mtime) did not change, a
# partition's image files, so identified, name a small file of their keys and header sizes in the store,
# written once (named by that identity: no lock, any writer writes the same bytes).

KEY_CACHE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("key", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)


def files_identity(paths: list[str]) -> str:
    """sha256 of the (path, size, mtime) of ``paths``, in order: what the key cache is named by."""
    digest = hashlib.sha256()
    for path in paths:
        st = Path(path).stat()
        digest.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode("utf-8", "replace"))
    return digest.hexdigest()


def read_key_cache(store: Path, identity: str) -> dict[str, tuple[str, tuple[int, int]]]:
    path = Path(store) / KEYS_DIR / identity[:2] / f"{identity}.arrow"
    try:
        table = _read_table(path)
    except (OSError, pa.ArrowException):  # absent or damaged: measured again
        return {}
    if not table.schema.equals(KEY_CACHE_SCHEMA):
        return {}
    columns = [table.column(c).to_pylist() for c in KEY_CACHE_SCHEMA.names]
    return {p: (k, (w, h)) for p, k, w, h in zip(*columns, strict=True)}


def write_key_cache(store: Path, identity: str, entries: dict[str, tuple[str, tuple[int, int]]]) -> None:
    path = Path(store) / KEYS_DIR / identity[:2] / f"{identity}.arrow"
    if path.is_file() or not entries:
        return
    paths = sorted(entries)
    table = pa.table(
        [
            pa.array(paths, pa.string()),
            pa.array([entries[p][0] for p in paths], pa.string()),
            pa.array([entries[p][1][0] for p in paths], pa.int32()),
            pa.array([entries[p][1][1] for p in paths], pa.int32()),
        ],
        schema=KEY_CACHE_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        with pa.ipc.new_stream(f, KEY_CACHE_SCHEMA) as writer:
            writer.write_table(table)


# ------------------------------------------------------------------------------------------- requests


def write_requests(path: Path, requests: dict[str, ImageSource]) -> list[int]:
    """A partition's image requests (key -> source, sorted by key), written atomically; the buckets they
    touch, sorted."""
    keys = sorted(requests)
    sources = [requests[k] for k in keys]
    table = pa.table(
        [
            pa.array(keys, pa.string()),
            pa.array([None if isinstance(s, EmbeddedImage) else s for s in sources], pa.string()),
            pa.array([s.data if isinstance(s, EmbeddedImage) else None for s in sources], pa.binary()),
        ],
        schema=REQUEST_SCHEMA,
    )
    with atomic_file(path) as f:
        with pa.ipc.new_stream(f, REQUEST_SCHEMA) as writer:
            writer.write_table(table)
    return sorted({bucket_of(k) for k in keys})


def request_buckets(path: Path) -> list[int]:
    """The buckets a request file touches."""
    return sorted({bucket_of(k) for k in _read_table(path).column("key").to_pylist()})


def read_requests(path: Path, bucket: int) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    prefix = f"{bucket:02x}"
    keys = table.column("key").to_pylist()
    lo = next((i for i, k in enumerate(keys) if k[:2] >= prefix), len(keys))
    hi = next((i for i in range(lo, len(keys)) if keys[i][:2] > prefix), len(keys))
    return table.slice(lo, hi - lo)


# ------------------------------------------------------------------------------------------- shards


def image_shard_schema(pixel_format: str, geometry: PatchGeometry) -> pa.Schema:
    """Columns of an image shard: one row per image, sorted by key. Plain Arrow types (see README)."""
    if pixel_format == "webp":
        pixels = pa.binary()
    else:
        pixels = pa.list_(pa.list_(_PIXEL_TYPE[pixel_format], geometry.values_per_patch(pixel_format)))
    return pa.schema(
        [
            pa.field("key", pa.string()),  # sha256 of the image's bytes
            pa.field("image_grid_thw", pa.list_(pa.int32(), 3)),
            pa.field("image_sizes", pa.list_(pa.int32(), 4)),  # original (w, h), pre-resized (w, h)
            pa.field("pixels", pixels),  # null when the image could not be decoded
            pa.field("pixels_sha256", pa.string()),  # of the pixel values' bytes (webp: the file)
            pa.field("error_code", pa.string()),  # why the image could not be used, or null
            pa.field("error_message", pa.string()),
        ],
        metadata={"qvl_image_store_version": str(STORE_VERSION), "pixel_format": pixel_format},
    )


def _read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def _bucket_shards(folder: Path, bucket: int) -> list[Path]:
    directory = folder / f"{bucket:02x}"
    return (
        sorted(p for p in directory.iterdir() if SHARD_FILE.fullmatch(p.name)) if directory.is_dir() else []
    )


def _shard_entry(folder: Path, path: Path) -> ImageShardEntry:
    table = _read_table(path)
    pixel_bytes = 0
    for chunk in table.column("pixels").chunks:
        if pa.types.is_binary(chunk.type):
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset :][: len(chunk) + 1]
            pixel_bytes += int(offsets[-1] - offsets[0])
        else:
            values = chunk.flatten().flatten()
            pixel_bytes += len(values) * values.type.bit_width // 8
    return ImageShardEntry(
        file=path.relative_to(folder).as_posix(),
        entries=table.num_rows,
        bytes=path.stat().st_size,
        sha256=path.name[: -len(".arrow")],
        pixel_bytes=pixel_bytes,
    )


@dataclass
class ImageTaskResult:
    bucket: int
    shards: list[ImageShardEntry] = field(default_factory=list)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (code, message)
    failed_in: dict[str, list[int]] = field(default_factory=dict)  # key -> partitions requesting it
    needed: int = 0
    processed: int = 0
    cpu_seconds: float = 0.0


def process_bucket(
    folder: str,
    bucket: int,
    requests: list[tuple[int, str]],
    load_processor: Callable[[], Any],
    pixel_format: str,
    image_max_pixels: int,
    image_min_pixels: int,
    max_decode_pixels: int,
    force: bool = False,
    max_shard_bytes: int = 256 << 20,
) -> ImageTaskResult:
    """One bucket: the images the partitions' request files (``(partition, path)``) ask for that the store
    does not hold yet (all of them with ``force``) are decoded, processed and written as one image shard;
    the result lists the shards that hold every requested key, and the keys that could not be decoded.
    Idempotent: what a killed run published is found by the next one."""
    started = time.process_time()
    folder_path = Path(folder)
    wanted: dict[str, tuple[str | None, bytes | None]] = {}
    requested_by: dict[str, list[int]] = {}
    for partition, path in sorted(requests):
        table = read_requests(Path(path), bucket)
        for key, file, data in zip(
            *(table.column(c).to_pylist() for c in ("key", "path", "data")), strict=True
        ):
            wanted.setdefault(key, (file, data))
            requested_by.setdefault(key, []).append(partition)
    result = ImageTaskResult(bucket, needed=len(wanted))
    holder: dict[str, Path] = {}
    errors: dict[str, tuple[str, str]] = {}
    if not force:
        for path in _bucket_shards(folder_path, bucket):
            try:
                table = _read_table(path).select(["key", "error_code", "error_message"])
            except (OSError, pa.ArrowException):  # damaged: its entries are processed again
                continue
            for key, code, message in zip(*(c.to_pylist() for c in table.columns), strict=True):
                if key in wanted and key not in holder:
                    holder[key] = path
                    if code is not None:
                        errors[key] = (code, message)
    missing = sorted(k for k in wanted if k not in holder)
    if missing:
        written, new_errors = _write_shards(
            folder_path,
            bucket,
            missing,
            wanted,
            load_processor(),
            pixel_format,
            (image_max_pixels, image_min_pixels, max_decode_pixels),
            max_shard_bytes,
        )
        holder.update(written)
        errors.update(new_errors)
        result.processed = len(missing)
    counts: dict[Path, int] = {}
    for path in holder.values():
        counts[path] = counts.get(path, 0) + 1
    for path in sorted(counts):
        result.shards.append(_shard_entry(folder_path, path))
    result.failed = dict(sorted(errors.items()))
    result.failed_in = {k: requested_by[k] for k in result.failed}
    result.cpu_seconds = time.process_time() - started
    return result


def _write_shards(
    folder: Path,
    bucket: int,
    keys: list[str],
    wanted: dict[str, tuple[str | None, bytes | None]],
    image_processor: Any,
    pixel_format: str,
    bounds: tuple[int, int, int],
    max_shard_bytes: int,
) -> tuple[dict[str, Path], dict[str, tuple[str, str]]]:
    """Process ``keys`` (sorted) into image shards of about ``max_shard_bytes`` of pixels each, in key
    order: a shard ends after the image that brings it to the limit, so a run resumed after some of them
    were published cuts the rest where a clean run does. Holds one shard's pixels at a time."""
    from qvl_data import vision

    image_max_pixels, image_min_pixels, max_decode_pixels = bounds
    geometry = PatchGeometry(
        int(image_processor.patch_size),
        int(image_processor.temporal_patch_size),
        int(image_processor.merge_size),
    )
    schema = image_shard_schema(pixel_format, geometry)
    columns: dict[str, list] = {name: [] for name in schema.names}
    errors: dict[str, tuple[str, str]] = {}
    written: dict[str, Path] = {}
    pending = 0
    for key in keys:
        file, data = wanted[key]
        name = file or "embedded image"
        grid = sizes = pixels = digest = code = message = None
        try:
            if data is None:
                data = vision.read_image_file(file)
                if bytes_key(data) != key:
                    raise QvlError(f"{file}: changed while the build ran; re-run the same command")
            image = vision.decode_image(data, name, max_decode_pixels)
            processed = vision.process_image(
                image,
                image_processor,
                "float32" if pixel_format == "float32" else "uint8",
                image_max_pixels,
                image_min_pixels,
            )
            grid = list(processed.grid_thw)
            sizes = [*processed.original_size, *processed.resized_size]
            if pixel_format == "webp":
                pixels = vision.encode_patches_webp(
                    processed.pixels,
                    processed.grid_thw,
                    image_processor.merge_size,
                    image_processor.patch_size,
                )
                digest = hashlib.sha256(pixels).hexdigest()
            else:
                pixels = processed.pixels
                digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
        except vision.ImageError as e:
            code, message = e.code, e.message
            errors[key] = (code, message)
        for column, value in zip(
            schema.names, (key, grid, sizes, pixels, digest, code, message), strict=True
        ):
            columns[column].append(value)
        pending += 0 if pixels is None else len(pixels) if isinstance(pixels, bytes) else pixels.nbytes
        if pending >= max_shard_bytes or key == keys[-1]:
            path = write_image_shard(folder, bucket, columns, pixel_format, geometry)
            written.update(dict.fromkeys(columns["key"], path))
            columns, pending = {name: [] for name in schema.names}, 0
    return written, errors


def write_image_shard(
    folder: Path, bucket: int, columns: dict[str, list], pixel_format: str, geometry: PatchGeometry
) -> Path:
    """Publish one image shard of ``bucket`` (``columns``: :func:`image_shard_schema`'s, one value per
    entry, sorted by key) under the sha256 of its bytes; its path."""
    schema = image_shard_schema(pixel_format, geometry)
    arrays = []
    for f in schema:
        values = columns[f.name]
        if f.name == "pixels" and pixel_format != "webp":
            arrays.append(_patch_lists(values, f.type))
        else:
            arrays.append(pa.array(values, f.type))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    data = sink.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    final = folder / f"{bucket:02x}" / f"{sha}.arrow"
    final.parent.mkdir(parents=True, exist_ok=True)
    if not (final.is_file() and final.stat().st_size == data.size):  # a racing build wrote the same bytes
        with atomic_file(final) as f:
            f.write(data)
    return final


def image_shard_entry(folder: Path, path: Path) -> ImageShardEntry:
    """The manifest's entry of a published image shard."""
    return _shard_entry(folder, path)


def _patch_lists(values: list, list_type: pa.DataType) -> pa.Array:
    """list<fixed_size_list> of per-image patch arrays (None: null), from numpy in one go."""
    width = list_type.value_type.list_size
    dtype = list_type.value_type.value_type.to_pandas_dtype()
    lengths = [0 if v is None else len(v) for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [np.asarray(v, dtype=dtype).reshape(-1) for v in values if v is not None]
    flat = np.concatenate(present) if present else np.zeros(0, dtype=dtype)
    child = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
    mask = pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(pa.array(offsets), child, mask=mask)


# ------------------------------------------------------------------------------------------- reading


class ImageLookup:
    """key -> (image shard, row) over the image shards a manifest lists, built on first use: per shard its
    key column as fixed-width bytes, all sorted once with numpy (memory: ~70 bytes per image)."""

    def __init__(
        self,
        folder: Path,
        shards: list[ImageShardEntry],
        open_table: Callable[[int, Path], pa.Table] | None = None,
    ):
        self.folder = folder
        self._open = open_table or (lambda _, path: _read_table(path))
        self.entries = shards
        self.paths = [folder / s.file for s in shards]
        self.tables: list[pa.Table | None] = [None] * len(shards)
        self._keys: np.ndarray | None = None
        self._where: np.ndarray | None = None

    def table(self, shard: int) -> pa.Table:
        if self.tables[shard] is None:
            self.tables[shard] = self._open(shard, self.paths[shard])
        return self.tables[shard]

    def _build(self) -> None:
        keys, where = [], []
        for shard in range(len(self.paths)):
            column = self.table(shard).column("key").to_numpy(zero_copy_only=False).astype("S64")
            keys.append(column)
            where.append(np.stack([np.full(len(column), shard), np.arange(len(column))], axis=1))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, "S64")
        order = np.argsort(all_keys, kind="stable")
        self._keys = all_keys[order]
        self._where = (np.concatenate(where) if where else np.zeros((0, 2), np.int64))[order]

    def find(self, keys: list[str]) -> list[tuple[int, int]]:
        if self._keys is None:
            self._build()
        wanted = np.asarray(keys, dtype="S64")
        at = np.searchsorted(self._keys, wanted)
        found = []
        for key, i in zip(keys, at, strict=True):
            if i >= len(self._keys) or self._keys[i] != key.encode():
                raise QvlError(
                    f"{self.folder}: image {key} is in no image shard the manifest lists; rebuild with --force"
                )
            found.append((int(self._where[i, 0]), int(self._where[i, 1])))
        return found


def image_shard_size_problem(path: Path, entry: ImageShardEntry) -> str | None:
    """Why an image shard the manifest lists is missing or of another size (or None)."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path}: an image shard the manifest lists is missing"
    if size != entry.bytes:
        return f"{path}: damaged image shard ({size:,} bytes, the manifest records {entry.bytes:,})"
    return None


def image_shard_problem(table: pa.Table, pixel_format: str, geometry: PatchGeometry) -> str | None:
    """Why a mapped image shard's Arrow structure is not one of this build's (or None)."""
    try:
        table.validate()
    except pa.ArrowException as e:
        return f"unreadable Arrow stream: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not table.schema.equals(image_shard_schema(pixel_format, geometry), check_metadata=True):
        return f"its columns are not those of a {pixel_format} image shard"
    return None


# ------------------------------------------------------------------------------------------- sharing


def register_build(store: Path, manifest_path: Path) -> None:
    """Name a build that uses ``store`` (outside its folder) in ``store/builds/``: gc keeps what it lists."""
    store, manifest_path = Path(store).resolve(), Path(manifest_path).resolve()
    # a store inside its build folder names the manifest relative to itself: the folder may move
    inside = manifest_path.parent == store.parent
    named = f"../{manifest_path.name}" if inside else str(manifest_path)
    name = hashlib.sha256(named.encode()).hexdigest()[:16] + ".json"
    (store / BUILDS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(store / BUILDS_DIR / name, {"manifest": named})


def section(
    store: Path, out_dir: Path, config_id_: str, shards: list[ImageShardEntry], images: int
) -> ImageStoreSection:
    store, out_dir = Path(store).resolve(), Path(out_dir).resolve()
    path = store.relative_to(out_dir).as_posix() if store.is_relative_to(out_dir) else str(store)
    return ImageStoreSection(path=path, config_id=config_id_, images=images, shards=shards)


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: int = 0
    builds: int = 0


def gc_images(store: Path, dry_run: bool = False) -> GcReport:
    """Remove the image shards of ``store`` that no registered build lists (a build whose manifest no
    longer exists, or no longer uses this store, is forgotten), and key caches not written in the last
    hour (a cache: a later build only hashes those files again); only files named as qvl names them (and
    their stale temporaries) are ever removed. Entries go with their whole shard."""
    store = Path(store).resolve()
    configs = [p for p in store.iterdir() if (p / CONFIG_FILE).is_file()] if store.is_dir() else []
    if not configs and not (store / BUILDS_DIR).is_dir():
        raise QvlError(f"{store}: not a qvl image store (no {BUILDS_DIR}/ and no <config>/{CONFIG_FILE})")
    report = GcReport()
    used: set[Path] = set()
    for record in sorted((store / BUILDS_DIR).glob("*.json")) if (store / BUILDS_DIR).is_dir() else []:
        try:
            manifest_path = store / json.loads(record.read_text(encoding="utf-8"))["manifest"]
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            info = manifest["image_store"]
            folder = (manifest_path.parent / info["path"] / info["config_id"]).resolve()
            files = {(folder / s["file"]).resolve() for s in info["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            if not dry_run:
                record.unlink(missing_ok=True)  # the build is gone
            continue
        if folder.parent != store:
            if not dry_run:
                record.unlink(missing_ok=True)  # it uses another store now
            continue
        report.builds += 1
        used |= files
    for config in sorted(p for p in store.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()):
        for bucket in sorted(p for p in config.iterdir() if p.is_dir() and BUCKET.fullmatch(p.name)):
            for file in sorted(bucket.iterdir()):
                ours = SHARD_FILE.fullmatch(file.name) or TMP_FILE.fullmatch(file.name)
                if not ours or not file.is_file() or file.is_symlink():
                    continue
                if file.resolve() in used:
                    report.kept += 1
                    continue
                if TMP_FILE.fullmatch(file.name) and time.time() - file.stat().st_mtime < 3600:
                    continue  # maybe a build writing now
                report.removed.append(str(file))
                report.bytes_freed += file.stat().st_size
                if not dry_run:
                    file.unlink()
    keys = store / KEYS_DIR
    for bucket in sorted(p for p in keys.iterdir() if BUCKET.fullmatch(p.name)) if keys.is_dir() else []:
        for file in sorted(bucket.iterdir()):
            ours = SHARD_FILE.fullmatch(file.name) or TMP_FILE.fullmatch(file.name)
            if ours and file.is_file() and time.time() - file.stat().st_mtime >= 3600:
                report.removed.append(str(file))
                report.bytes_freed += file.stat().st_size
                if not dry_run:
                    file.unlink()
    return report
