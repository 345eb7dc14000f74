"""Data for training: a map-style dataset over the mapped shards, the rank split, the collate (the step plan
is :mod:`qvl_train.plan`; a batch becomes model inputs in :func:`qvl_train.steps.to_device`).

* :class:`ShardDataset` reads rows from the memory-mapped Arrow shards. It opens them lazily in whichever
  process reads (a data-loader worker maps the files itself rather than receiving a pickled mapping), so the
  resident memory stays flat whatever the dataset size.
* :class:`RankBatchSampler` is ``DistributedSampler`` (seeded permutation per epoch, padded by wrapping
  around, ``indices[rank::world]``) plus a start position, so a resumed run continues with exactly the next
  batch. The data loader deals its batches out to the workers.
* :func:`collate` pads to a multiple of 8.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from qvl_data.errors import QvlError
from qvl_data.processor import PAD_ID
from qvl_data.shards import ShardSet, load_manifest
from qvl_data.template import IGNORE_INDEX

PAD_MULTIPLE = 8
_COLUMNS = ("source", "index", "input_ids", "labels", "image_grid_thw", "pixels")


# --------------------------------------------------------------------------------------------- dataset


class ShardDataset(Dataset):
    """Rows of a qvl build: ``{"row", "input_ids", "labels", "pixels", "image_grid_thw", ...}``.

    Item ``i`` is the build's row ``rows[i]`` when ``rows`` (global row numbers, e.g. one side of
    :func:`split_rows`) is given, else row ``i``; ``item["row"]`` is always the global row number.

    ``pixels`` are the stored patches (uint8 ``(n, 588)``, also for webp shards, or float32 ``(n, 1176)``);
    the list columns are copied out of the files with ``pread`` (:meth:`ShardSet.read`) and the few mapped
    pages that locating them touched are released, so the loader's RSS does not grow over a pass.
    """

    def __init__(
        self,
        data_dir: str | Path,
        max_rows: int = 0,
        rows: list[int] | None = None,
        verify_images: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.verify_images = verify_images  # each image read is checked against its recorded sha256
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
            self._shards = ShardSet(self.data_dir, columns=list(_COLUMNS), check_images=self.verify_images)
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
