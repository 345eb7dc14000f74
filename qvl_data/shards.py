"""The on-disk format: Arrow IPC stream shards + manifest.json, written atomically, read memory-mapped.

Layout of an output directory::

    manifest.json            written last: its presence means the build is complete
    rejected.jsonl           every input row that was not written, with its reason
    shards/part-<fp8>-00000-000.arrow  Arrow IPC *stream* files (what ``datasets.Dataset.from_file`` opens)

A shard is written as ``<name>.arrow.tmp`` and renamed when complete, so a reader never sees half a
shard; readers only open the shards the manifest lists. This module imports pyarrow and numpy only, so
the trainer can use it on a slim GPU image.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qvl_data.errors import QvlError
from qvl_data.files import file_kind, write_json_atomic
from qvl_data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PATCH_DIM,
    PIXEL_FORMATS,
    QWEN2_VL_GEOMETRY,
    Manifest,
    PatchGeometry,
    ShardEntry,
)
from qvl_data.image_store import (
    ImageLookup,
    image_shard_problem,
    image_shard_size_problem,
    store_path,
)

# write_json_atomic (qvl_data.files) is re-exported: the build writes its manifest and records with it.
__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PATCH_DIM",
    "PIXEL_FORMATS",
    "ShardWriter",
    "ShardSet",
    "write_json_atomic",
]

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
SHARD_DIR = "shards"
#: The names of the shard files a build writes (``ShardWriter`` with :func:`shard_prefix`), and their
#: half-written ``.tmp``: the only files of ``shards/`` a build ever removes. The optional 8 hex digits are
#: the build's fingerprint (absent in the names of builds before it was added): a rebuild with other inputs
#: or options writes names of its own, so the previous build stays complete until the new manifest
#: replaces it.
SHARD_NAME = re.compile(r"part-(?:[0-9a-f]{8}-)?\d{5}-\d{3}\.arrow(\.tmp)?")


def shard_prefix(fingerprint: str, partition: int | None = None) -> str:
    """The name prefix of a partition's shard files (of all the build's, without ``partition``): the same
    for the same build (byte-identical manifests across runs), another one for another fingerprint."""
    build = f"part-{fingerprint[:8]}"
    return build if partition is None else f"{build}-{partition:05d}"


def shard_schema(pixel_format: str, geometry: PatchGeometry = QWEN2_VL_GEOMETRY) -> pa.Schema:
    """Columns of every shard. Plain Arrow types only, so datasets and polars read them without qvl. The
    pixels' patch width is the family's (``geometry``: 588 / 1176 values for 14-px patches, 768 / 1536 for
    Qwen3-VL's 16-px ones)."""
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("source", pa.string()),
            pa.field("index", pa.int64()),  # row number in its source file
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("labels", pa.list_(pa.int32())),  # -100 where not trained
            pa.field("length", pa.int32()),
            pa.field("trained_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
            pa.field("images", pa.list_(pa.string())),
            pa.field("image_grid_thw", pa.list_(pa.list_(pa.int32(), 3))),
            # original (w, h) then (w, h) after the pre-resize, per image
            pa.field("image_sizes", pa.list_(pa.list_(pa.int32(), 4))),
            # per image, its key in the image store (qvl_data/image_store.py), which holds its pixels
            pa.field("image_keys", pa.list_(pa.string())),
        ],
        metadata={
            "qvl_format": FORMAT_NAME,
            "qvl_format_version": str(FORMAT_VERSION),
            "pixel_format": pixel_format,
        },
    )


def _list_array(values: list, value_type: pa.DataType, width: int | None = None) -> pa.Array:
    """list<value_type> (or list<fixed_size_list>) built from numpy in one go rather than per element."""
    lengths = [np.size(v) // (width or 1) for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v).reshape(-1) for v in values]) if values else np.zeros(0)
    child = pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type)
    if width is not None:
        child = pa.FixedSizeListArray.from_arrays(child, width)
    return pa.ListArray.from_arrays(pa.array(offsets), child)


def rows_to_batch(
    rows: list, pixel_format: str, geometry: PatchGeometry = QWEN2_VL_GEOMETRY
) -> pa.RecordBatch:
    """EncodedRows -> one record batch with ``shard_schema(pixel_format, geometry)``."""
    columns = [
        pa.array([r.id for r in rows], pa.string()),
        pa.array([r.source for r in rows], pa.string()),
        pa.array([r.index for r in rows], pa.int64()),
        _list_array([r.input_ids for r in rows], pa.int32()),
        _list_array([r.labels for r in rows], pa.int32()),
        pa.array([len(r.input_ids) for r in rows], pa.int32()),
        pa.array([r.trained_tokens for r in rows], pa.int32()),
        pa.array([r.truncated for r in rows], pa.bool_()),
        pa.array([r.image_paths for r in rows], pa.list_(pa.string())),
        _list_array([np.asarray(r.image_grid_thw, dtype=np.int32).reshape(-1) for r in rows], pa.int32(), 3),
        _list_array([np.asarray(r.image_sizes, dtype=np.int32).reshape(-1) for r in rows], pa.int32(), 4),
        pa.array([r.image_keys for r in rows], pa.list_(pa.string())),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=shard_schema(pixel_format, geometry))


class _HashingFile:
    """A file opened for writing that feeds every byte it is given to a sha256 as well: a shard's checksum
    without reading the shard back. Arrow writes to it through ``pa.PythonFile``."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        """Everything written reaches the disk (before the shard is renamed into place)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()


class ShardWriter:
    """Appends encoded rows to size-bounded shards; a shard becomes visible only once complete.

    Shard boundaries depend only on the rows (never on timing or worker count), so the same input gives
    byte-identical shards whatever ``--num-proc`` was. Files are named ``shards/<prefix>-NNN.arrow``; a
    build's partition task uses its partition number as the prefix.
    """

    def __init__(
        self,
        out_dir: Path,
        pixel_format: str,
        max_shard_bytes: int = 256 << 20,
        batch_rows: int = 64,
        prefix: str = "part",
        geometry: PatchGeometry = QWEN2_VL_GEOMETRY,
    ):
        self.out_dir = Path(out_dir)
        self.geometry = geometry
        self.prefix = prefix
        self.pixel_format = pixel_format
        self.max_shard_bytes = max_shard_bytes
        self.batch_rows = batch_rows
        self.schema = shard_schema(pixel_format, geometry)
        self.shards: list[ShardEntry] = []
        self._pending: list = []
        self._pending_bytes = 0
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._sink: Any = None
        self._file: _HashingFile | None = None
        self._info: ShardEntry | None = None
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def write(self, row) -> None:
        self._pending.append(row)
        self._pending_bytes += 8 * len(row.input_ids) + row.pixel_bytes
        # Small record batches keep the writer's memory bounded even with many large images.
        if len(self._pending) >= self.batch_rows or self._pending_bytes >= 32 << 20:
            self._flush()

    def _open_shard(self) -> None:
        name = f"{SHARD_DIR}/{self.prefix}-{len(self.shards):03d}.arrow"
        self._file = _HashingFile(self.out_dir / (name + ".tmp"))
        self._sink = pa.PythonFile(self._file, mode="w")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._info = ShardEntry(
            file=name, rows=0, tokens=0, trained_tokens=0, image_tokens=0, images=0, bytes=0
        )

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._open_shard()
        batch = rows_to_batch(self._pending, self.pixel_format, self.geometry)
        self._writer.write_batch(batch)
        info = self._info
        info.rows += batch.num_rows
        for r in self._pending:
            info.tokens += len(r.input_ids)
            info.trained_tokens += r.trained_tokens
            info.image_tokens += r.image_tokens
            info.images += len(r.image_paths)
            info.pixel_bytes += r.pixel_bytes
        self._pending, self._pending_bytes = [], 0
        if self._sink.tell() >= self.max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()  # the stream's end marker goes through the sink too
        self._file.sync()
        self._sink.close()
        final = self.out_dir / self._info.file
        os.replace(Path(str(final) + ".tmp"), final)
        self._info.sha256 = self._file.digest.hexdigest()
        self._info.bytes = final.stat().st_size
        self.shards.append(self._info)
        self._writer = self._sink = self._file = self._info = None

    def close(self) -> list[ShardEntry]:
        self._flush()
        if self._writer is not None:
            self._close_shard()
        return self.shards


def load_manifest(out_dir: Path) -> Manifest:
    """Read and check a shard directory's manifest; a one-line QvlError when it is missing, foreign, of
    another format version or malformed."""
    path = Path(out_dir) / MANIFEST
    if not Path(out_dir).is_dir():
        raise QvlError(f"{out_dir}: no such shard directory (build one with `qvl-data build`)")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise QvlError(
            f"{path}: missing; {out_dir} is not a complete qvl build (re-run `qvl-data build`)"
        ) from None
    if not stat.S_ISREG(mode):  # a FIFO would block this read forever
        raise QvlError(f"{path}: is {file_kind(mode)}, not a qvl manifest file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QvlError(f"{path}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QvlError(f"{path}: not a qvl shard manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QvlError(
            f"{path}: shard format version {manifest.get('format_version')} but this qvl reads version "
            f"{FORMAT_VERSION}; rebuild with `qvl-data build --force`"
        )
    try:
        return Manifest.from_dict(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise QvlError(
            f"{path}: malformed manifest ({type(e).__name__}: {e}); rebuild with --force"
        ) from None


def open_shard_table(path: Path) -> pa.Table:
    """Memory-map one shard: nothing is read into RAM until a column is touched."""
    return _map_shard(path)[0]


def open_image_shard_table(path: Path) -> pa.Table:
    """Memory-map one image shard; ValueError when it is not an Arrow stream."""
    try:
        return _map_shard(path)[0]
    except pa.ArrowException as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


#: How to repair a shard that fails :func:`shard_problem`'s checks (the re-run finds the same problem).
REPAIR = (
    "re-run the same `qvl-data build` (it redoes only that partition), "
    "or rebuild everything with `qvl-data build --force`"
)


class DamagedShard(QvlError):
    """A shard that is missing or does not match its manifest entry (size, schema, row count)."""


def shard_problem(
    path: Path, shard: ShardEntry, pixel_format: str, geometry: PatchGeometry = QWEN2_VL_GEOMETRY
) -> str | None:
    """Why the shard at ``path`` does not match ``shard`` (its size, its Arrow structure: schema and row
    count, read from the IPC stream's headers, no data page touched), or None when it does. Cheap: for the
    file's content, see ``qvl_data/verify.py`` (sha256)."""
    try:
        _open_checked(path, shard, pixel_format, geometry)
    except DamagedShard as e:
        return str(e)
    return None


def open_checked_shard(
    path: Path, shard: ShardEntry, pixel_format: str, geometry: PatchGeometry = QWEN2_VL_GEOMETRY
) -> tuple[pa.Table, mmap.mmap]:
    """The shard's table and memory map (see :func:`_map_shard`) once :func:`shard_problem` finds nothing
    wrong; a one-line :class:`DamagedShard` naming the file and how to repair it otherwise."""
    try:
        return _open_checked(path, shard, pixel_format, geometry)
    except DamagedShard as e:
        raise DamagedShard(f"{e}; {REPAIR}") from None


def _open_checked(
    path: Path, shard: ShardEntry, pixel_format: str, geometry: PatchGeometry
) -> tuple[pa.Table, mmap.mmap]:
    try:
        st = os.stat(path)
    except OSError:
        raise DamagedShard(f"{path}: listed in the manifest but missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise DamagedShard(f"{path}: listed in the manifest but is {file_kind(st.st_mode)}")
    if st.st_size != shard.bytes:
        raise DamagedShard(
            f"{path}: damaged or unreadable shard ({st.st_size:,} bytes, the manifest records {shard.bytes:,})"
        )
    try:
        table, mapping = _map_shard(path)
        table.validate()  # buffer sizes against lengths: cheap, reads no data page
    except (OSError, ValueError, pa.ArrowException) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedShard(
            f"{path}: damaged or unreadable shard (unreadable Arrow stream: {first_line})"
        ) from None
    if not table.schema.equals(shard_schema(pixel_format, geometry), check_metadata=True):
        raise DamagedShard(
            f"{path}: damaged or unreadable shard (its columns are not those of a {pixel_format} shard)"
        )
    if table.num_rows != shard.rows:
        raise DamagedShard(
            f"{path}: damaged or unreadable shard ({table.num_rows} rows, the manifest records {shard.rows})"
        )
    return table, mapping


def _map_shard(path: Path) -> tuple[pa.Table, mmap.mmap]:
    """The shard's table, zero-copy over a memory map, and the map. A buffer's address minus the map's
    first address is the buffer's offset in the file (see :meth:`ShardSet.read`); the map itself allows
    ``madvise`` (see :meth:`ShardSet.release`)."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return pa.ipc.open_stream(pa.py_buffer(mapping)).read_all(), mapping


def _pread_into(fd: int, out: np.ndarray, offset: int, path: Path) -> None:
    """Fill ``out`` (C-contiguous) with the file's bytes from ``offset`` on."""
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        if hasattr(os, "preadv"):  # straight into ``out``
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # e.g. macOS: one more copy
            chunk = os.pread(fd, len(view) - done, offset + done)
            view[done : done + len(chunk)] = chunk
            got = len(chunk)
        if got <= 0:
            raise QvlError(
                f"{path}: ends at byte {offset + done}, expected {len(view) - done} more (truncated shard?)"
            )
        done += got


def _binary_offsets(values: pa.BinaryArray) -> np.ndarray:
    """Item k of a (possibly sliced) binary array is bytes ``offsets[k]:offsets[k+1]`` of its data buffer."""
    return np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset :][: len(values) + 1]


def _image_pixels(table: pa.Table, row: int) -> np.ndarray:
    """One image shard entry's stored values, flat, as a zero-copy view into its buffers."""
    column = table.column("pixels")
    chunk, local = _chunk_of(column, row)
    if pa.types.is_binary(chunk.type):  # webp: the file's bytes
        offsets = _binary_offsets(chunk)
        return np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[local] : offsets[local + 1]]
    return chunk[local].values.flatten().to_numpy(zero_copy_only=True)


def _chunk_of(column: pa.ChunkedArray, row: int) -> tuple[pa.Array, int]:
    for chunk in column.chunks:
        if row < len(chunk):
            return chunk, row
        row -= len(chunk)
    raise IndexError(row)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class ShardSet:
    """All rows of a build, addressable by global row number, memory-mapped.

    ``row(i)`` returns python lists for the text columns and leaves pixels to ``pixel_values(i)`` /
    ``pixel_patches(i)``, which slice the mapped buffers without copying the shard.

    :meth:`read` is what a training loader uses instead: it copies one row's list column out of the file
    with ``pread`` rather than through the map. Pages touched through a map count in the process's RSS
    (once per process that maps the file), so a pass over 24 GB of shards would show a 24 GB loader in
    ``top``; with ``pread`` they stay in the kernel's page cache only, and ``POSIX_FADV_RANDOM`` keeps the
    kernel from reading ahead around rows a shuffled epoch will not read next.
    """

    def __init__(self, out_dir: Path, columns: list[str] | None = None, check_images: bool = False):
        """``check_images``: every image :meth:`read` reads is checked against the sha256 its image shard
        entry records (a flipped byte is one line naming the shard, instead of wrong pixels)."""
        self.out_dir = Path(out_dir)
        self.check_images = check_images
        self.manifest = load_manifest(out_dir)
        self.pixel_format = self.manifest.pixel_format
        self.tables, self.paths, self._maps, self._bases = [], [], [], []
        for shard in self.manifest.shards:
            path = self.out_dir / shard.file
            table, mapping = open_checked_shard(path, shard, self.pixel_format, self.manifest.geometry)
            if columns:  # the pixels are the image store's; a row's image keys find them
                wanted = [c for c in columns if c != "pixels"]
                table = table.select(wanted + ["image_keys"] * ("image_keys" not in wanted))
            self.tables.append(table)
            self.paths.append(path)
            self._maps.append(mapping)
            self._bases.append(pa.py_buffer(mapping).address)
            self._release(len(self._maps) - 1)  # the stream's headers, read just now
        self.offsets = np.cumsum([0] + [t.num_rows for t in self.tables])
        self._fds: dict[int, int] = {}  # shard -> fd for read(), opened on first use
        weakref.finalize(self, _close_all, self._fds)
        self.images: ImageLookup | None = None  # the image store's shards, after the row shards
        self._image_slots: dict[int, int] = {}
        self._image_extents: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        store = self.manifest.image_store
        if store is not None:
            folder = store_path(store, self.out_dir)
            for entry in store.shards:  # cheap: sizes now, each one's Arrow structure when first opened
                problem = image_shard_size_problem(folder / entry.file, entry)
                if problem:
                    raise DamagedShard(f"{problem}; {REPAIR}")
            self.images = ImageLookup(folder, store.shards, self._open_image_shard)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open_image_shard(self, image_shard: int, path: Path) -> pa.Table:
        """An image shard mapped like a row shard (its buffers' offsets in the file known, for pread)."""
        table, mapping = _map_shard(path)
        problem = image_shard_problem(table, self.pixel_format, self.manifest.geometry)
        if problem:
            raise DamagedShard(f"{path}: damaged or unreadable image shard ({problem}); {REPAIR}")
        self.paths.append(path)
        self._maps.append(mapping)
        self._bases.append(pa.py_buffer(mapping).address)
        self._image_slots[image_shard] = len(self.paths) - 1  # where read() finds its file and map
        return table

    def _row_images(self, i: int) -> list[tuple[int, int]]:
        """Row i's images as (image shard, entry) pairs, in order."""
        shard, local = self._shard_of(i)
        keys = self.tables[shard].column("image_keys")[local].as_py() if self.images else []
        return self.images.find(keys) if keys else []

    def _image_views(self, i: int) -> tuple[list[np.ndarray], list[int], list[list[int]]]:
        """Row i's images in the store: each one's stored values (a flat zero-copy view into its mapped
        image shard), the index of that shard in ``self.paths``, and each one's grid."""
        views, where, grids = [], [], []
        for image_shard, row in self._row_images(i):
            table = self.images.table(image_shard)
            views.append(_image_pixels(table, row))
            where.append(self._image_slots[image_shard])
            grids.append(table.column("image_grid_thw")[row].as_py())
        return views, where, grids

    def _extents(self, image_shard: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(slot in ``self.paths``, each entry's first and end byte in the file, each entry's grid) of an
        image shard, computed once: what :meth:`_pread_images` reads a row's images with."""
        found = self._image_extents.get(image_shard)
        if found is None:
            table = self.images.table(image_shard)
            slot, base = self._image_slots[image_shard], self._bases[self._image_slots[image_shard]]
            bounds = []
            for chunk in table.column("pixels").chunks:
                if pa.types.is_binary(chunk.type):
                    offsets = _binary_offsets(chunk).astype(np.int64)
                    bounds.append(chunk.buffers()[2].address - base + offsets)
                else:
                    flat = chunk.values.flatten()
                    width = chunk.type.value_type.list_size * flat.type.bit_width // 8
                    lists = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset :][
                        : len(chunk) + 1
                    ]
                    start = flat.buffers()[1].address + flat.offset * flat.type.bit_width // 8 - base
                    bounds.append(start + lists.astype(np.int64) * width)
            starts = np.concatenate([b[:-1] for b in bounds]) if bounds else np.zeros(0, np.int64)
            ends = np.concatenate([b[1:] for b in bounds]) if bounds else np.zeros(0, np.int64)
            grids = table.column("image_grid_thw").combine_chunks().flatten().to_numpy().reshape(-1, 3)
            found = self._image_extents[image_shard] = (slot, np.stack([starts, ends], axis=1), grids)
        return found

    def _pread_images(self, i: int) -> tuple[np.ndarray, list[tuple[int, int]], list]:
        """Row i's images' stored values read with ``pread`` into one new flat array, the byte range of
        each image in it, and each one's grid."""
        parts = []
        for image_shard, row in self._row_images(i):
            slot, extents, grids = self._extents(image_shard)
            parts.append((slot, int(extents[row, 0]), int(extents[row, 1]), grids[row]))
        dtype = np.float32 if self.pixel_format == "float32" else np.uint8
        total = sum(end - start for _, start, end, _ in parts)
        out = np.empty(total // np.dtype(dtype).itemsize, dtype=dtype)
        raw, at, ranges = out.view(np.uint8), 0, []
        for slot, start, end, _ in parts:
            self._pread_at(slot, raw[at : at + end - start], start)
            ranges.append((at, at + end - start))
            at += end - start
        if self.check_images:
            for (image_shard, row), (a, b) in zip(self._row_images(i), ranges, strict=True):
                want = self.images.table(image_shard).column("pixels_sha256")[row].as_py()
                if hashlib.sha256(raw[a:b]).hexdigest() != want:
                    path = self.images.paths[image_shard]
                    raise DamagedShard(f"{path}: image {row}'s pixels differ from their sha256; {REPAIR}")
        return out, ranges, [grid for *_, grid in parts]

    def _shard_of(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range (0..{len(self) - 1})")
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return shard, i - int(self.offsets[shard])

    def locate(self, i: int) -> tuple[pa.Table, int]:
        shard, local = self._shard_of(i)
        return self.tables[shard], local

    def row(self, i: int, columns: tuple[str, ...] | None = None) -> dict:
        table, local = self.locate(i)
        names = columns or tuple(table.column_names)
        return {name: table.column(name)[local].as_py() for name in names}

    def release(self, i: int) -> None:
        """Drop row i's shard pages from this process's memory (``MADV_DONTNEED``; they stay in the page
        cache, and a later access maps them again). :meth:`read` copies a row's lists with ``pread``, but
        locating them reads the lists' offsets through the map, and each such fault maps up to 64 KiB
        around it (the kernel's fault-around): without this a pass over 24 GB of shards keeps ~150 MB of
        such pages resident."""
        self._release(self._shard_of(i)[0])

    def _release(self, shard: int) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._maps[shard].madvise(mmap.MADV_DONTNEED)

    def _mapped(self, shard: int, local: int, column: str) -> np.ndarray:
        """Row ``local``'s values of a list column as a flat zero-copy view into the map (no page touched);
        for ``list<binary>`` (webp pixels) the bytes of all its items, back to back."""
        values = self.tables[shard].column(column)[local].values
        if isinstance(values, pa.FixedSizeListArray):  # pixels: list<fixed_size_list<uint8|float32>>
            values = values.flatten()
        if pa.types.is_binary(values.type):
            if not len(values):
                return np.zeros(0, dtype=np.uint8)
            offsets = _binary_offsets(values)
            return np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        return values.to_numpy(zero_copy_only=True)

    def read(self, i: int, column: str) -> np.ndarray:
        """A copy of row i's values of a list column (``input_ids``, ``labels``, ``pixels``: its images'
        stored values back to back), flat, read from the files with ``pread`` (see the class docstring);
        equal to the mapped values."""
        if column == "pixels":
            return self._pread_images(i)[0]
        shard, local = self._shard_of(i)
        return self._pread_copy(shard, self._mapped(shard, local, column))

    def _stacked(self, values: list[np.ndarray]) -> np.ndarray:
        if len(values) == 1:
            return values[0]
        if values:
            return np.concatenate(values)
        dtype = np.float32 if self.pixel_format == "float32" else np.uint8
        return np.zeros(0, dtype=dtype)

    def _pread_copy(self, shard: int, view: np.ndarray) -> np.ndarray:
        out = np.empty_like(view)
        if out.nbytes:
            self._pread_at(shard, out, view.ctypes.data - self._bases[shard])
        return out

    def _pread_at(self, shard: int, out: np.ndarray, offset: int) -> None:
        if not out.nbytes:
            return
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        _pread_into(fd, out, offset, self.paths[shard])

    def _patches(self, images: list[np.ndarray], grids: list[list[int]]) -> np.ndarray:
        """Stored pixel values of one row's images (flat, each) -> ``(n_patches, PATCH_DIM)``; webp images
        are decoded."""
        geometry = self.manifest.geometry
        width = geometry.values_per_patch(self.pixel_format)
        if self.pixel_format != "webp":
            return self._stacked(images).reshape(-1, width)
        from qvl_data.vision import decode_patches_webp  # PIL only for webp shards

        decoded = [
            decode_patches_webp(memoryview(image), grid, geometry.merge_size, geometry.patch_size)
            for image, grid in zip(images, grids, strict=True)
        ]
        if len(decoded) == 1:
            return decoded[0]
        return np.concatenate(decoded) if decoded else np.zeros((0, width), dtype=np.uint8)

    def pixel_patches(self, i: int) -> np.ndarray:
        """The stored pixels of row i as a ``(n_patches, 588 | 1176)`` array: for uint8 and float32 a view
        into the mapped image shard when the row has one image (a copy of the views joined otherwise),
        decoded (a new array of uint8 patches) for webp."""
        views, _, grids = self._image_views(i)
        return self._patches(views, grids)

    def read_pixel_patches(self, i: int) -> np.ndarray:
        """:meth:`pixel_patches` as a new array read with ``pread`` (what the training loader uses)."""
        values, ranges, grids = self._pread_images(i)
        if self.pixel_format != "webp":
            return values.reshape(-1, self.manifest.geometry.values_per_patch(self.pixel_format))
        return self._patches([values[a:b] for a, b in ranges], grids)

    def pixel_values(self, i: int) -> np.ndarray:
        """float32 pixel_values (n_patches, 1176) equal to the HF image processor's output for this row."""
        patches = self.pixel_patches(i)
        if self.pixel_format == "float32":
            return patches
        from qvl_data.vision import pixel_values_from_uint8  # numpy only

        p = self.manifest.processor
        return pixel_values_from_uint8(
            patches, p.image_mean, p.image_std, p.rescale_factor, p.temporal_patch_size
        )

    def find(self, source: str, index: int) -> int:
        """Global row number of (source, index in its file)."""
        base = 0
        for table in self.tables:
            src = table.column("source").to_numpy(zero_copy_only=False)
            idx = table.column("index").to_numpy()
            hits = np.nonzero((src == source) & (idx == index))[0]
            if len(hits):
                return base + int(hits[0])
            base += table.num_rows
        raise KeyError(f"{source}:{index} is not in {self.out_dir} (rejected or not built)")
