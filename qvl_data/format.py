"""The on-disk format in one place: pixel formats, patch geometry and the typed manifest.

A build directory holds ``manifest.json`` (a :class:`Manifest`, written last), ``rejected.jsonl`` and
``shards/*.arrow``. The build writes the manifest from these dataclasses and every reader (``stats``,
``inspect``, the trainer) reads it back through :func:`Manifest.from_dict`, so a field has one name, one
type and one default. This module imports the standard library only: the trainer uses it on a slim GPU
image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_NAME = "qvl-shards"
# 2: shards written per partition, partitions and library versions in the manifest
# 3: pixels in an image store (qvl_data/image_store.py), rows name their images by key
FORMAT_VERSION = 3

#: How the ``pixels`` column stores a row's images:
#:   uint8    list<fixed_size_list<uint8, 588>>     patches before rescale/normalize (one temporal copy)
#:   float32  list<fixed_size_list<float32, 1176>>  the processor's pixel_values, as is
#:   (588 / 1176 for 14-px patches; Qwen3-VL's 16-px patches: 768 / 1536)
#:   webp     list<binary>                          one lossless WebP per image, of the uint8 patches' image
PIXEL_FORMATS = ("uint8", "float32", "webp")
CHANNELS = 3


@dataclass(frozen=True)
class PatchGeometry:
    """How the Qwen2-VL processor cuts an image: ``patch_size`` pixels a side, ``temporal_patch_size``
    frames (a still image is repeated), ``merge_size`` x ``merge_size`` patches per language token. The
    defaults are Qwen2-VL's and Qwen2.5-VL's; Qwen3-VL's patches are 16 px (qvl_data/family.py; a build
    records its own in the manifest's processor section)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    def values_per_patch(self, pixel_format: str) -> int:
        """Values per stored patch as read: uint8 and webp (decoded) keep one frame, float32 all of them."""
        frame = CHANNELS * self.patch_size * self.patch_size
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
        return frame * self.temporal_patch_size if pixel_format == "float32" else frame


QWEN2_VL_GEOMETRY = PatchGeometry()
#: Values per patch for each pixel format with the Qwen2-VL geometry (588 or 1176).
PATCH_DIM = {f: QWEN2_VL_GEOMETRY.values_per_patch(f) for f in PIXEL_FORMATS}


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """``cls(**data)`` keeping only known fields: a manifest stays readable when a later qvl adds one."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ShardEntry:
    file: str  # relative to the build directory
    rows: int
    tokens: int
    trained_tokens: int
    image_tokens: int
    images: int
    bytes: int
    pixel_bytes: int = 0  # stored bytes of the pixels column's values (what --pixel-format changes)
    sha256: str = ""


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

    def add(self, other: SourceTotals) -> None:
        for f in dataclasses.fields(self):
            if f.name == "max_length":
                self.max_length = max(self.max_length, other.max_length)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class ProcessorSummary:
    model: str
    digest: str
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def geometry(self) -> PatchGeometry:
        return PatchGeometry(self.patch_size, self.temporal_patch_size, self.merge_size)


@dataclass
class BuildOptions:
    """The options that decide the output's bytes, as the fingerprint hashes them: the fields of
    ``qvl_data.config.BuildConfig`` declared ``output="option"``, plus the template. (The inputs, hashed
    by content, are the manifest's own fields: dataset_dir, datasets, processor, versions.)"""

    cutoff_len: int
    image_max_pixels: int
    image_min_pixels: int
    mask_history: bool
    pixel_format: str
    set_vars: list[str]
    partition_rows: int  # as given; 0 = auto (see qvl_data/partition.py)
    template: str = "qwen2_vl"
    family: str = "qwen2_5_vl"  # qvl_data/family.py FAMILIES; a manifest before families were Qwen2.5-VL's
    enable_thinking: bool = True
    preserve_thinking: bool = False
    # None in a manifest written before qvl recorded them (they were hashed all along)
    shard_size_mb: int | None = None
    media_dir: str | None = None  # absolute; None: the dataset dir
    allow_outside_images: bool | None = None


@dataclass
class PartitionEntry:
    """One partition's completion record: what its task wrote. ``image_digest`` covers the (path, size,
    mtime) of the images its rows use, so a re-run can tell whether they changed."""

    index: int
    source: str
    file: str  # the data file the rows come from
    first_row: int  # index in its dataset of the first row
    rows: int  # input rows (written + rejected)
    image_digest: str
    totals: SourceTotals
    rejected_by_reason: dict[str, int]
    shards: list[ShardEntry]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartitionEntry:
        entry = _from_dict(cls, data)
        entry.totals = _from_dict(SourceTotals, data["totals"])
        entry.shards = [_from_dict(ShardEntry, s) for s in data["shards"]]
        return entry


@dataclass
class ImageShardEntry:
    file: str  # relative to the store's config folder: <bucket>/<sha256>.arrow
    entries: int
    bytes: int
    sha256: str
    pixel_bytes: int = 0  # stored bytes of its pixels column's values (what --pixel-format changes)


@dataclass
class ImageStoreSection:
    """Where a build's pixels are: the store (relative to the build folder when inside it), its pixel
    configuration's folder, and the image shards holding every image the rows use."""

    path: str
    config_id: str
    images: int  # distinct images the build's rows and rejections asked for
    shards: list[ImageShardEntry] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageStoreSection:
        section = _from_dict(cls, data)
        section.shards = [_from_dict(ImageShardEntry, s) for s in data["shards"]]
        return section


@dataclass
class Rejected:
    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    fingerprint: str
    qvl_version: str
    dataset_dir: str
    datasets: list[str]
    options: BuildOptions
    processor: ProcessorSummary
    versions: dict[str, str]  # the libraries whose versions decide the bytes (Pillow, transformers, ...)
    input_rows: int
    totals: SourceTotals
    sources: dict[str, SourceTotals]
    rejected: Rejected
    shards: list[ShardEntry]
    partitions: list[PartitionEntry]
    image_store: ImageStoreSection | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def pixel_format(self) -> str:
        return self.options.pixel_format

    @property
    def geometry(self) -> PatchGeometry:
        return self.processor.geometry

    @property
    def family(self) -> str:
        """The model family the shards were built for (qvl_data/family.py FAMILIES)."""
        return self.options.family

    @property
    def template(self) -> str:
        return self.options.template

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # format first: a person opening the file sees what it is
        return {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        m = _from_dict(cls, data)
        m.options = _from_dict(BuildOptions, data["options"])
        m.processor = _from_dict(ProcessorSummary, data["processor"])
        m.totals = _from_dict(SourceTotals, data["totals"])
        m.sources = {k: _from_dict(SourceTotals, v) for k, v in data["sources"].items()}
        m.rejected = _from_dict(Rejected, data["rejected"])
        m.shards = [_from_dict(ShardEntry, s) for s in data["shards"]]
        m.partitions = [PartitionEntry.from_dict(p) for p in data["partitions"]]
        if data.get("image_store") is not None:
            m.image_store = ImageStoreSection.from_dict(data["image_store"])
        return m
