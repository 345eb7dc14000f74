"""Held-out evaluation: eval loss and next-token accuracy of a model on a loader, summed exactly over ranks.

:func:`evaluate` is a plain function of (model, batches); the training loop calls it every ``eval_steps`` and
at the end, and anything else (a script, a test) can call it the same way. What the numbers mean is in
docs/semantics.md section 7 (held-out split, eval loss and accuracy):

* eval loss: the token-mean next-token cross-entropy over the trained tokens (labels != -100, the masking and
  shift of training, through the same :func:`qvl_train.steps.next_token_logits`);
* eval accuracy: the share of those tokens whose label at t + 1 is the argmax of the logits at t.

It must not change training: it runs under ``torch.no_grad()`` in eval mode (no dropout, so no RNG draws),
restores every module's train/eval flag afterwards, calls the model unwrapped (no DDP hooks), and its loader
has its own generator; a run with evaluation trains bit-identical adapters to one without.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qvl_data.template import IGNORE_INDEX
from qvl_train.data import ShardDataset, collate
from qvl_train.distributed import Dist
from qvl_train.steps import make_loader, next_token_logits


def eval_batches(rows: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's evaluation batches over items ``0 .. rows - 1``: items ``rank, rank + world, ...`` in
    order, ``batch_size`` at a time. Unlike the training sampler nothing is padded by wrapping around, so
    every item is evaluated exactly once over all ranks and the summed counts are exact (a rank may get one
    row fewer, or none)."""
    mine = list(range(rank, rows, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_eval_loader(
    dataset: ShardDataset, batch_size: int, dist: Dist, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """The loader of this rank's share of ``dataset`` (:func:`eval_batches`), plainly collated (one row per
    sequence). Its order depends only on the dataset, the batch size, the rank and the world size, so every
    evaluation of a run, resumed or not, sees the same batches."""
    batches = eval_batches(len(dataset), batch_size, dist.rank, dist.world_size)
    return make_loader(dataset, batches, dist.device, num_workers, seed=0, collate_fn=collate)


def token_loss_and_correct(
    model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of next-token cross-entropies, number of correct argmax predictions)`` over the trained tokens
    of one batch (fp32 loss, int64 count, on the model's device). The loss is what
    :func:`qvl_train.steps.token_loss_sum` computes."""
    logits, targets = next_token_logits(model, inputs, labels)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)).sum()
    return loss, correct


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    dist: Dist,
    to_inputs: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], Any] = nullcontext,
) -> dict[str, float | int]:
    """Evaluate ``model`` (not its DDP wrapper) on this rank's ``batches`` (collated, e.g. from
    :func:`make_eval_loader`) and sum over ranks: ``{"eval_loss", "eval_accuracy", "eval_tokens",
    "eval_rows"}``. Every rank must call it (one all-reduce at the end). Loss and accuracy are NaN when the
    batches hold no trained token.

    Sums stay on the device until the end (no per-batch sync); the loss is summed in float64 and the counts
    are integers, so the result does not depend on how the rows are split over ranks beyond the rounding of
    each batch's fp32 loss sum.
    """
    modes = [(module, module.training) for module in model.modules()]
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    correct = torch.zeros((), dtype=torch.int64, device=dist.device)
    tokens = rows = 0
    model.eval()  # no dropout: nothing draws from the RNG, and gradient checkpointing is off
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = to_inputs(batch)
                with autocast():
                    loss, hits = token_loss_and_correct(model, inputs, batch["labels"])
                loss_sum += loss.double()
                correct += hits
                tokens += batch["trained_tokens"]
                rows += len(batch["rows"])
    finally:
        for module, training in modes:  # each module's own flag: model.train() would switch on all of them
            module.training = training
    counts = torch.tensor([tokens, rows], dtype=torch.float64, device=dist.device)
    local = torch.cat([torch.stack([loss_sum, correct.double()]), counts])  # one all-reduce for all four
    total_loss, total_correct, total_tokens, total_rows = dist.sum(local).tolist()
    nan = float("nan")
    return {
        "eval_loss": total_loss / total_tokens if total_tokens else nan,
        "eval_accuracy": total_correct / total_tokens if total_tokens else nan,
        "eval_tokens": int(total_tokens),
        "eval_rows": int(total_rows),
    }


def eval_set_identity(dataset: ShardDataset | None, val_size: float, eval_data: str) -> dict[str, Any]:
    """What a checkpoint records of the evaluation set, so a resume can refuse a different split: the
    options, the row count and a digest of (the build's fingerprint, the global rows). ``{}`` without one."""
    if dataset is None:
        return {}
    import hashlib

    rows = [dataset.global_row(i) for i in range(len(dataset))]
    digest = hashlib.sha256(f"{dataset.manifest.fingerprint}:{rows}".encode()).hexdigest()
    return {
        "val_size": val_size,
        "eval_data": str(Path(eval_data).resolve()) if eval_data else "",
        "rows": len(rows),
        "digest": digest,
    }
