"""Data for training: the step plan, a map-style dataset over the mapped shards, the rank split, the collate.

* :func:`make_plan` is the one place where rows turn into batches, optimizer steps and warmup steps
  (docs/semantics.md section 7); the dry run, the progress bar and the loop all use it.
* :class:`ShardDataset` reads rows from the memory-mapped Arrow shards. It opens them lazily in whichever
  process reads (a data-loader worker maps the files itself rather than receiving a pickled mapping), so the
  resident memory stays flat whatever the dataset size.
* :class:`RankBatchSampler` is ``DistributedSampler`` (seeded permutation per epoch, padded by wrapping
  around, ``indices[rank::world]``) plus a start position, so a resumed run continues with exactly the next
  batch. The data loader deals its batches out to the workers.
* :func:`collate` pads to a multiple of 8; :func:`to_device` expands uint8 pixels on the training device and
  drops the attention mask of right-padded batches (causal attention: padding changes no trained token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from qvl_data.errors import QvlError
from qvl_data.format import ProcessorSummary
from qvl_data.processor import IMAGE_PAD_ID, PAD_ID
from qvl_data.shards import ShardSet, load_manifest
from qvl_data.template import IGNORE_INDEX

PAD_MULTIPLE = 8
_COLUMNS = ("source", "index", "input_ids", "labels", "image_grid_thw", "pixels")


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Plan:
    """How many rows, batches and optimizer steps a run has. Steps never depend on anything else."""

    rows: int
    world_size: int
    batch_size: int
    grad_accum: int
    per_rank_rows: int  # ceil(rows / world): the sampler pads by wrapping around, like DistributedSampler
    per_rank_batches: int  # micro-batches per rank and epoch
    steps_per_epoch: int  # optimizer steps per epoch: the last one may have fewer micro-batches
    total_steps: int
    warmup_steps: int
    epochs: float  # epochs the total steps span
    packing_len: int = 0  # with --packing: the token budget of a packed sequence; 0: not packed
    packed_rows: int = 0  # with --packing: the dataset rows the packs hold (``rows`` counts the packs)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def micro_batches(self, step: int) -> tuple[int, int, int]:
        """``(epoch, first batch, number of batches)`` of global optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        first = k * self.grad_accum
        return epoch, first, min(self.grad_accum, self.per_rank_batches - first)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "effective_batch": self.effective_batch}


def make_plan(
    rows: int,
    world_size: int,
    batch_size: int,
    grad_accum: int,
    num_train_epochs: float,
    max_steps: int = 0,
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
    packing_len: int = 0,
    packed_rows: int = 0,
) -> Plan:
    """Rows -> steps (docs/semantics.md section 7): per-rank batches = ceil(ceil(N / world) / batch); steps per epoch =
    ceil(per-rank batches / accumulation); total = max_steps or ceil(epochs * steps per epoch); warmup =
    warmup_steps or ceil(warmup_ratio * total). 1096 rows, 2 ranks, accumulation 8, 3 epochs -> 207, 21.

    With packing, N is the number of packed sequences (:func:`qvl_train.packing.pack_rows`) and ``batch``
    counts packed sequences; ``packing_len`` and ``packed_rows`` (the rows they hold) are recorded."""
    if rows < 1:
        raise QvlError("the shards hold no rows")
    per_rank_rows = math.ceil(rows / world_size)
    per_rank_batches = math.ceil(per_rank_rows / batch_size)
    steps_per_epoch = math.ceil(per_rank_batches / grad_accum)
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
    warmup = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)
    return Plan(
        rows=rows,
        world_size=world_size,
        batch_size=batch_size,
        grad_accum=grad_accum,
        per_rank_rows=per_rank_rows,
        per_rank_batches=per_rank_batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        epochs=total / steps_per_epoch,
        packing_len=packing_len,
        packed_rows=packed_rows,
    )


# --------------------------------------------------------------------------------------------- dataset


class ShardDataset(Dataset):
    """Rows of a qvl build: ``{"row", "input_ids", "labels", "pixels", "image_grid_thw", ...}``.

    Item ``i`` is the build's row ``rows[i]`` when ``rows`` (global row numbers, e.g. one side of
    :func:`split_rows`) is given, else row ``i``; ``item["row"]`` is always the global row number.

    ``pixels`` are the stored patches (uint8 ``(n, 588)``, also for webp shards, or float32 ``(n, 1176)``);
    the list columns are copied out of the files with ``pread`` (:meth:`ShardSet.read`) and the few mapped
    pages that locating them touched are released, so the loader's RSS does not grow over a pass.
    """

    def __init__(self, data_dir: str | Path, max_rows: int = 0, rows: list[int] | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)  # QvlError when missing, foreign or malformed
        self.pixel_format = self.manifest.pixel_format
        self.processor = self.manifest.processor
        shards = ShardSet(self.data_dir, columns=list(_COLUMNS))  # checks that every listed shard exists
        self.total_rows = len(shards)
        self.rows = list(rows) if rows is not None else None
        available = len(self.rows) if self.rows is not None else self.total_rows
        self.num_rows = min(available, max_rows) if max_rows > 0 else available
        self._shards: ShardSet | None = None  # opened lazily, per process

    def __len__(self) -> int:
        return self.num_rows

    def global_row(self, i: int) -> int:
        """The build's row number of item ``i``."""
        return self.rows[i] if self.rows is not None else i

    def lengths(self) -> list[int]:
        """Token count of every item, in item order (the shards' ``length`` column: no token is read)."""
        import numpy as np

        shards = ShardSet(self.data_dir, columns=["length"])
        column = np.concatenate([t.column("length").to_numpy() for t in shards.tables])
        items = self.rows[: self.num_rows] if self.rows is not None else range(self.num_rows)
        return column[np.asarray(items, dtype=np.int64)].tolist()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = None  # workers map the files themselves
        return state

    def shards(self) -> ShardSet:
        if self._shards is None:
            self._shards = ShardSet(self.data_dir, columns=list(_COLUMNS))
        return self._shards

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range (0..{self.num_rows - 1})")
        i = self.global_row(i)
        shards = self.shards()
        row = shards.row(i, columns=("source", "index", "image_grid_thw"))
        grids = row["image_grid_thw"] or []
        pixels = None
        if grids:  # read with pread, not through the map: the loader's RSS stays flat over a pass
            pixels = torch.from_numpy(shards.read_pixel_patches(i))  # webp: decoded here, in the worker
        item = {
            "row": i,
            "source": row["source"],
            "index": row["index"],
            "input_ids": torch.from_numpy(shards.read(i, "input_ids")).long(),
            "labels": torch.from_numpy(shards.read(i, "labels")).long(),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
            "pixels": pixels,
        }
        shards.release(i)  # and the few mapped pages that locating the row touched
        return item


def split_rows(
    data_dir: str | Path, val_size: float, seed: int, max_rows: int = 0
) -> tuple[list[int], list[int]]:
    """``(train rows, validation rows)``: global row numbers of the build (its first ``max_rows`` if > 0),
    each list ascending.

    A row is held out by its id, not its position in a shuffled order: the rows are ranked by
    ``sha256(f"{seed}:{source}:{index}")`` and the first ``n`` form the validation set, where ``n`` is
    ``val_size`` rows (>= 1) or ``round(val_size * rows)`` (a fraction, at least 1). The split reads nothing
    but the build, so every rank, world size and resume computes the same one, and a row keeps its side when
    the build grows.
    """
    import hashlib

    import pyarrow.compute as pc

    shards = ShardSet(Path(data_dir), columns=["source", "index"])
    total = min(len(shards), max_rows) if max_rows > 0 else len(shards)
    sources = [v for t in shards.tables for v in t.column("source").to_pylist()][:total]
    indices = [v for t in shards.tables for v in pc.cast(t.column("index"), "int64").to_pylist()][:total]
    n = int(val_size) if val_size >= 1 else max(1, round(val_size * total))
    if n >= total:
        raise QvlError(f"val_size {val_size:g} holds out {n} of {total} rows and leaves none to train on")
    keys = [
        hashlib.sha256(f"{seed}:{s}:{i}".encode()).digest() for s, i in zip(sources, indices, strict=True)
    ]
    ranked = sorted(range(total), key=keys.__getitem__)
    held = set(ranked[:n])
    return [r for r in range(total) if r not in held], sorted(held)


# --------------------------------------------------------------------------------------------- sampler


def epoch_order(rows: int, epoch: int, seed: int) -> list[int]:
    """The epoch's permutation of all rows: ``torch.randperm`` seeded with ``seed + epoch``."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(rows, generator=generator).tolist()


def rank_rows(rows: int, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's rows for the epoch, exactly as ``DistributedSampler(shuffle=True, drop_last=False)``:
    the permutation is padded to a multiple of the world size by wrapping around, then strided by rank."""
    order = epoch_order(rows, epoch, seed)
    total = math.ceil(rows / world_size) * world_size
    order += (order * math.ceil(total / rows))[: total - rows]
    return order[rank:total:world_size]


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of row numbers) of one epoch, from a start batch on.

    The state a checkpoint needs is ``(epoch, batches consumed)``; :meth:`set_epoch` restores it.
    """

    def __init__(self, rows: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.rows, self.batch_size, self.rank, self.world_size, self.seed = (
            rows,
            batch_size,
            rank,
            world_size,
            seed,
        )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def batches(self) -> list[list[int]]:
        rows = rank_rows(self.rows, self.epoch, self.seed, self.rank, self.world_size)
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def __iter__(self):
        yield from self.batches()[self.start :]

    def __len__(self) -> int:
        return max(0, math.ceil(math.ceil(self.rows / self.world_size) / self.batch_size) - self.start)


# --------------------------------------------------------------------------------------------- collate


def collate(rows: list[dict[str, Any]], pad_id: int = PAD_ID, multiple: int = PAD_MULTIPLE) -> dict[str, Any]:
    """Right-pad to the longest row rounded up to ``multiple``: input_ids with ``pad_id``, labels with -100,
    attention_mask 0. Pixels and grids of all rows are concatenated in row order (None without images)."""
    length = max(len(r["input_ids"]) for r in rows)
    length = -(-length // multiple) * multiple
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = r["input_ids"]
        labels[i, :n] = r["labels"]
        attention_mask[i, :n] = 1
    pixels = [r["pixels"] for r in rows if r["pixels"] is not None]
    grids = [r["image_grid_thw"] for r in rows if len(r["image_grid_thw"])]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        # one row's tensors as they are (the trainer's default batch of 1): no copy of its pixels
        "pixels": (torch.cat(pixels) if len(pixels) > 1 else pixels[0]) if pixels else None,
        "image_grid_thw": (torch.cat(grids) if len(grids) > 1 else grids[0]) if grids else None,
        "trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),  # what the shifted loss counts
        "rows": [(r["row"], r["source"], r["index"]) for r in rows],
    }


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is its tokens then only padding (what :func:`collate` builds), checked on the CPU.

    Then the mask is not passed to the model: with causal attention a real token never attends to a later
    padding position, and the 3-D RoPE positions of the real tokens do not depend on what follows them, so
    every trained token's output is the same with or without it. Without a mask transformers keeps the fast
    causal SDPA / flash path; with one (zeros in almost every batch, as rows are padded to a multiple of 8) it
    builds a 4-D mask, which rules out the flash SDPA kernel and repeats K/V for grouped-query attention.
    """
    lengths = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1])
    return bool(torch.equal(attention_mask.bool(), positions < lengths))


def to_device(
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    processor: ProcessorSummary,
) -> dict[str, Any]:
    """The model's keyword arguments on ``device``: uint8 patches become the processor's float32
    ``pixel_values`` there (a lookup-table gather, bit-identical to the HF processor), then ``dtype``. No
    ``attention_mask`` for right-padded batches (:func:`is_right_padded`). A packed batch
    (:class:`qvl_train.packing.PackedCollate`) brings its per-row ``position_ids`` and, unless the model
    uses flash attention, a block-diagonal causal mask (:func:`qvl_train.packing.packed_attention`)."""
    from qvl_data.vision import pixel_values_from_uint8_torch

    non_blocking = device.type == "cuda"
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device, non_blocking=non_blocking)}
    if "segments" in batch:  # packed
        from qvl_train.packing import packed_attention

        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=non_blocking)
        mask = packed_attention(batch, device, dtype)
        if mask is not None:
            inputs["attention_mask"] = mask
    elif not is_right_padded(batch["attention_mask"]):
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=non_blocking)
    if batch["pixels"] is not None:
        pixels = batch["pixels"].to(device, non_blocking=non_blocking)
        if pixels.dtype == torch.uint8:  # uint8 and webp shards
            pixels = pixel_values_from_uint8_torch(
                pixels,
                processor.image_mean,
                processor.image_std,
                processor.rescale_factor,
                processor.temporal_patch_size,
            )
        inputs["pixel_values"] = pixels.to(dtype)
        inputs["image_grid_thw"] = batch["image_grid_thw"].to(device)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_PAD_ID).int()  # 1 = image (3D RoPE positions)
    return inputs
