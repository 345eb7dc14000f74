"""Sample packing (docs/semantics.md section 7, "Packing"): several rows in one sequence, each row computed
exactly as if it were alone.

* :func:`pack_rows` is the pack plan: the rows' token counts (the shards' ``length`` column), visited in a
  seeded order, placed best-fit into sequences of at most ``packing_len`` tokens. It reads nothing but the
  lengths, the budget and the seed, so every rank, world size and resume computes the same packs.
* :class:`PackedDataset` serves whole packs (lists of rows) of a :class:`~qvl_train.data.ShardDataset`;
  :class:`PackedBatchSampler` deals the packs out to the ranks in a new seeded order each epoch, padding
  the last round with empty packs instead of repeating any (no row is trained twice in an epoch).
* :class:`PackedCollate` lays the rows of the micro-batch's packs end to end and gives every token its
  row's own positions: the model's multimodal (t, h, w) positions for that row alone, computed with the
  model family's own ``get_rope_index`` (:class:`RopeIndex`), and text positions that restart at 0 per row.
* :func:`packed_attention` keeps attention within rows: a block-diagonal causal 4-D mask for SDPA (boolean)
  and eager (additive) attention; nothing for flash attention, whose varlen path finds the rows from the
  restarting text positions (the collate then puts the whole micro-batch in one sequence, because
  transformers only takes that path for a batch of one).
"""

from __future__ import annotations

import bisect
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from qvl_data.errors import QvlError
from qvl_data.family import model_side, model_side_for_config, transformers_class
from qvl_data.format import Manifest, ProcessorSummary
from qvl_data.processor import IMAGE_PAD_ID, PAD_ID
from qvl_data.template import IGNORE_INDEX
from qvl_train.data import PAD_MULTIPLE, RankBatchSampler, ShardDataset, epoch_order

#: The pack number the sampler deals out where a rank has no real pack left: it collates to no rows.
EMPTY = -1
#: Attention kinds (:func:`attention_kind`): how a packed batch keeps rows apart for each implementation.
VARLEN, SDPA, EAGER = "varlen", "sdpa", "eager"

# ------------------------------------------------------------------------------------------- the plan


def pack_rows(lengths: Sequence[int], packing_len: int, seed: int) -> list[list[int]]:
    """The pack plan: ``lengths[i]`` tokens of item ``i`` -> packs (lists of item numbers) of at most
    ``packing_len`` tokens, every item in exactly one pack.

    Items are visited in the seeded order ``torch.randperm(n)`` (generator seeded with ``seed``) and each
    goes, best fit, into the open pack with the least room that still holds it (the most recently
    filled such pack on a tie), or opens a new one. Within a pack, items keep the order they were placed
    in. The random visiting order mixes long and short rows in each pack (sorting by length would pack
    all the long rows together); with rows much shorter than the budget it fills packs almost as well.
    """
    if packing_len < 1:
        raise QvlError(f"packing_len must be >= 1, got {packing_len}")
    too_long = [(n, i) for i, n in enumerate(lengths) if n > packing_len]
    if too_long:
        n, i = max(too_long)
        raise QvlError(
            f"packing_len {packing_len} is shorter than item {i} ({n} tokens); use --packing-len >= {n} "
            "(0: the build's cutoff_len)"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    packs: list[list[int]] = []
    room: list[int] = []  # sorted free room of the packs that can still take an item
    holders: dict[int, list[int]] = {}  # free room -> packs with exactly that room
    for item in order:
        n = int(lengths[item])
        k = bisect.bisect_left(room, n)
        if k == len(room):
            pack, left = len(packs), packing_len - n
            packs.append([item])
        else:
            free = room[k]
            pack = holders[free].pop()
            if not holders[free]:
                del holders[free], room[k]
            packs[pack].append(item)
            left = free - n
        if left > 0:
            if left not in holders:
                holders[left] = []
                bisect.insort(room, left)
            holders[left].append(pack)
    return packs


class PackedDataset(Dataset):
    """Item ``p`` is pack ``p`` of :func:`pack_rows` over ``dataset``'s items: the list of its rows (each as
    ``dataset`` returns it); :data:`EMPTY` gives no rows. ``packing_len`` 0 means the build's cutoff_len."""

    def __init__(self, dataset: ShardDataset, packing_len: int = 0, seed: int = 0):
        self.dataset = dataset
        cutoff = dataset.manifest.options.cutoff_len
        self.packing_len = packing_len or cutoff
        lengths = dataset.lengths()
        longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
        if longest is not None and lengths[longest] > self.packing_len:  # named by its row in the build
            raise QvlError(
                f"packing_len {self.packing_len} is shorter than row {dataset.global_row(longest)} of "
                f"{dataset.data_dir} ({lengths[longest]} tokens); use --packing-len >= {lengths[longest]} "
                f"or 0 (the build's cutoff_len, {cutoff})"
            )
        self.packs = pack_rows(lengths, self.packing_len, seed)

    @property
    def processor(self) -> ProcessorSummary:
        return self.dataset.processor

    @property
    def manifest(self) -> Manifest:
        return self.dataset.manifest

    @property
    def num_rows(self) -> int:
        """Rows in all packs (the wrapped dataset's length)."""
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, p: int) -> list[dict[str, Any]]:
        if p == EMPTY:
            return []
        return [self.dataset[i] for i in self.packs[p]]


# ------------------------------------------------------------------------------------------ sampler


def rank_packs(packs: int, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's packs for the epoch: the epoch's seeded permutation of the packs
    (:func:`qvl_train.data.epoch_order`), padded with :data:`EMPTY` to a multiple of the world size, then
    strided by rank. Unlike rows (padded by wrapping around), no pack is repeated: the padding costs a
    few padding tokens instead of training a pack of rows twice."""
    order = epoch_order(packs, epoch, seed)
    order += [EMPTY] * (math.ceil(packs / world_size) * world_size - packs)
    return order[rank::world_size]


class PackedBatchSampler(RankBatchSampler):
    """:class:`~qvl_train.data.RankBatchSampler` over packs: yields this rank's micro-batches (lists of
    ``batch_size`` pack numbers) of one epoch from a start batch on. ``rows`` is the number of packs; the
    batch count per rank, and so the plan (:func:`qvl_train.plan.make_plan` over packs), is the same."""

    def batches(self) -> list[list[int]]:
        packs = rank_packs(self.rows, self.epoch, self.seed, self.rank, self.world_size)
        return [packs[i : i + self.batch_size] for i in range(0, len(packs), self.batch_size)]


# -------------------------------------------------------------------------------------------- collate


def attention_kind(attn_implementation: str) -> str:
    """How packed rows are kept apart: :data:`VARLEN` for flash attention (restarting positions, no mask),
    :data:`SDPA` (boolean 4-D mask) or :data:`EAGER` (additive 4-D mask). QvlError for the others."""
    if "flash" in attn_implementation:  # transformers' own test (is_flash_attention_requested)
        return VARLEN
    if attn_implementation in (SDPA, EAGER):
        return attn_implementation
    raise QvlError(
        f"--packing supports --attn-implementation sdpa, eager and flash_attention_2/3, not {attn_implementation!r}"
    )


class RopeIndex:
    """One row's 3-D rotary positions, ``(3, length)``, from the model family's own ``get_rope_index``
    (``Qwen2_5_VLModel.get_rope_index``, ``Qwen3VLModel.get_rope_index``, ...: qvl_data/family.py
    ``ModelSide.base_model_class``, chosen by the config's model_type) applied to that row alone, as the
    model does for an unpacked row.

    The method reads only ``self.config`` and ``self.get_vision_position_ids``, so it runs here on a small
    holder of the model config: the collate needs no model, and pickles to loader workers with the config.
    """

    def __init__(self, config: Any):
        self.config = config
        self.family = model_side_for_config(config).family

    def __call__(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        owner_class = transformers_class(model_side(self.family), "base_model_class")
        grids = image_grid_thw if image_grid_thw is not None and len(image_grid_thw) else None
        kwargs: dict[str, Any] = {"image_grid_thw": grids}
        if _rope_takes_token_types(
            owner_class
        ):  # newer transformers; older ones find the image tokens themselves
            kwargs["mm_token_type_ids"] = (input_ids == IMAGE_PAD_ID).int()[None]
        # getattr: releases whose get_rope_index computes the image positions inline have no such method
        owner = _RopeOwner(self.config, getattr(owner_class, "get_vision_position_ids", None))
        positions, _deltas = owner_class.get_rope_index(owner, input_ids[None], **kwargs)
        return positions[:, 0]


class _RopeOwner:
    """Stands in for the model as ``self`` of ``get_rope_index``: its config and the model class's own
    ``get_vision_position_ids``."""

    def __init__(self, config: Any, vision_position_ids: Any):
        self.config, self._vision_position_ids = config, vision_position_ids

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._vision_position_ids(self, *args, **kwargs)


@functools.cache
def _rope_takes_token_types(owner_class: type) -> bool:
    return "mm_token_type_ids" in inspect.signature(owner_class.get_rope_index).parameters


class PackedCollate:
    """Packs (lists of rows from :class:`PackedDataset`) -> one packed batch.

    Each pack is one sequence of the batch: its rows end to end, right-padded with ``pad_id`` to the longest
    sequence rounded up to ``multiple``; for flash attention (:data:`VARLEN`) all the packs of the
    micro-batch form one sequence instead. Per token: ``labels`` (-100 on each row's first token, so no row
    is trained to predict the next row's start; that token is never a target of its own row either),
    ``segments`` (the row's number within its sequence; the padding is one more segment) and
    ``position_ids`` ``(4, batch, length)``: text positions restarting at 0 per row (and per padding tail),
    then the row's own (t, h, w) positions (:class:`RopeIndex`). Pixels and grids of all rows are
    concatenated in the rows' order, so images stay whole and in the order of their placeholder tokens.
    ``spans`` lists ``(sequence, start, end)`` per row, in the order of ``rows``.
    """

    def __init__(
        self,
        config: Any,
        attn_implementation: str = "sdpa",
        pad_id: int = PAD_ID,
        multiple: int = PAD_MULTIPLE,
    ):
        self.rope = RopeIndex(config)
        self.attention = attention_kind(attn_implementation)
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, packs: list[list[dict[str, Any]]]) -> dict[str, Any]:
        sequences = [pack for pack in packs if pack]  # empty packs (the sampler's padding) add nothing
        if self.attention == VARLEN and len(sequences) > 1:
            sequences = [[row for pack in sequences for row in pack]]
        longest = max((sum(len(r["input_ids"]) for r in seq) for seq in sequences), default=0)
        length = max(1, -(-longest // self.multiple)) * self.multiple
        batch = max(1, len(sequences))  # a micro-batch of empty packs is one sequence of padding
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        segments = torch.zeros((batch, length), dtype=torch.long)
        position_ids = torch.zeros((4, batch, length), dtype=torch.long)
        spans, rows, pixels, grids = [], [], [], []
        for b in range(batch):
            start = 0
            for k, row in enumerate(sequences[b] if sequences else []):
                n = len(row["input_ids"])
                end = start + n
                input_ids[b, start:end] = row["input_ids"]
                labels[b, start:end] = row["labels"]
                labels[b, start] = IGNORE_INDEX
                attention_mask[b, start:end] = 1
                segments[b, start:end] = k
                position_ids[0, b, start:end] = torch.arange(n)
                position_ids[1:, b, start:end] = self.rope(row["input_ids"], row["image_grid_thw"])
                spans.append((b, start, end))
                rows.append((row["row"], row["source"], row["index"]))
                if row["pixels"] is not None:
                    pixels.append(row["pixels"])
                    grids.append(row["image_grid_thw"])
                start = end
            segments[b, start:] = len(sequences[b]) if sequences else 0
            position_ids[:, b, start:] = torch.arange(length - start)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,  # 1 on row tokens; never given to the model (segments are)
            "segments": segments,
            "position_ids": position_ids,
            "attention": self.attention,
            "pixels": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.cat(grids) if grids else None,
            "trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),  # what the shifted loss counts
            "rows": rows,
            "spans": spans,
        }


# ------------------------------------------------------------------------------------------ attention


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, length, length)`` boolean: query i may attend to key j iff j <= i and both belong to the
    same segment (row, or padding tail) of the same sequence. Every query sees at least itself, so no
    softmax row is empty (an all-masked row gives NaN, which a backward pass would spread)."""
    length = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones((length, length), dtype=torch.bool, device=segments.device).tril()
    return (same & causal)[:, None]


def packed_attention(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``attention_mask`` argument for a packed batch on ``device``: boolean block-diagonal causal for
    SDPA, the same as an additive mask (0 / the dtype's minimum, as transformers builds it) for eager, and
    None for flash attention (the restarting text positions in ``position_ids`` select its varlen path)."""
    if batch["attention"] == VARLEN:
        return None
    mask = block_causal_mask(batch["segments"].to(device, non_blocking=device.type == "cuda"))
    if batch["attention"] == SDPA:
        return mask
    additive = torch.zeros(mask.shape, dtype=dtype, device=device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)
