"""The step plan: how many rows, batches, optimizer steps and warmup steps a run has.

:func:`make_plan` is the one place where rows turn into batches, optimizer steps and warmup steps
(docs/semantics.md section 7); the dry run, the progress bar, the loop and the resume check all use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qvl_data.errors import QvlError


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
