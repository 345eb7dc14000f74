"""The training pieces, one home each: data loader, batch -> model inputs (:func:`to_device`), autocast, loss,
optimizer.

Training (:mod:`qvl_train.loop`), evaluation, generation and the benchmarks call these instead of
re-deriving them, so a change to how a batch reaches the model (uint8 pixels, the attention mask, the
image-token types) or to the loss happens once.

Loss normalisation: every micro-batch contributes ``sum of token cross-entropies * world / T`` where T is
the number of trained tokens in the whole accumulation window on all ranks, counted before the window. DDP
averages gradients over ranks, so the optimised quantity is exactly the mean token loss of the window,
whatever the padding, the batch size or how the window is split across micro-batches and ranks; that same
mean is what gets logged.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from qvl_data.format import ProcessorSummary
from qvl_data.processor import IMAGE_PAD_ID
from qvl_data.template import IGNORE_INDEX
from qvl_train.data import collate
from qvl_train.distributed import Dist
from qvl_train.packing import packed_attention

# ------------------------------------------------------------------------------------------------ data


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_sampler: Iterable[list[int]],
    device: torch.device,
    num_workers: int = 0,
    seed: int = 0,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate,
) -> torch.utils.data.DataLoader:
    """The data loader over ``dataset`` in the batches ``batch_sampler`` yields. Its generator is its own
    (seeded), so iterating it never touches the global RNG: training resumes exactly, and an evaluation pass
    leaves the training RNG stream as it was."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is its tokens then only padding (what :func:`qvl_train.data.collate` builds), checked on the CPU.

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


@functools.cache
def model_takes_token_types() -> bool:
    """Whether this transformers' Qwen2.5-VL forward takes ``mm_token_type_ids`` (newer releases); older
    ones find the image tokens themselves and reject the argument."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


def batch_to_inputs(
    batch: dict[str, Any], device: torch.device, dtype: torch.dtype, processor: ProcessorSummary
) -> dict[str, Any]:
    """A collated batch -> the model's keyword arguments on ``device`` (:func:`to_device`),
    minus the arguments this transformers release does not take."""
    inputs = to_device(batch, device, dtype, processor)
    if not model_takes_token_types():
        inputs.pop("mm_token_type_ids", None)
    return inputs


def input_builder(
    device: torch.device, dtype: torch.dtype, processor: ProcessorSummary
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """:func:`batch_to_inputs` with the device, dtype and processor fixed (what :func:`run_window` takes)."""
    return functools.partial(batch_to_inputs, device=device, dtype=dtype, processor=processor)


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    """A context factory: bf16 autocast on CUDA with bf16 weights (LoRA weights stay fp32), else nothing."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return nullcontext


# ------------------------------------------------------------------------------------------------ loss


#: Kept positions of a micro-batch above which the loss is computed in chunks of LOSS_CHUNK positions (see
#: :func:`token_loss_sum`). A packed 2,048-token sequence of alpaca rows keeps ~1,600: its fp32 logits are
#: 1,600 x 151,936 x 4 B = 0.97 GB, and the log-softmax and its gradient hold as much again each.
CHUNKED_LOSS_ABOVE = 1024
LOSS_CHUNK = 256


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the trained tokens, in fp32
    (the logits and targets of :func:`next_token_logits`).

    A micro-batch with more than :data:`CHUNKED_LOSS_ABOVE` kept positions (long rows, packed sequences) never holds
    all their logits: the model returns the last hidden states there, and the vocabulary projection and the
    cross-entropy run :data:`LOSS_CHUNK` positions at a time, each recomputed in the backward pass (the same
    sum up to float rounding; up to :data:`CHUNKED_LOSS_ABOVE` positions, bit for bit the unchunked path)."""
    kept = _kept_positions(labels)
    if labels.shape[0] * kept.numel() <= CHUNKED_LOSS_ABOVE:
        logits, targets = next_token_logits(model, inputs, labels)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    lm_head = _output_embeddings(model)
    with _hidden_states_instead_of_logits(model):
        hidden, targets = next_token_logits(model, inputs, labels, float_logits=False)
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(hidden.split(LOSS_CHUNK), targets.split(LOSS_CHUNK), strict=True):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, lm_head, part, part_targets, use_reentrant=False
        )
    return total


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary projection (``lm_head``) under DDP's and PEFT's wrappers."""
    inner = getattr(model, "module", model)  # DDP
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    return base.get_output_embeddings()


@contextmanager
def _hidden_states_instead_of_logits(model: torch.nn.Module) -> Iterator[None]:
    """The model's forward with its lm_head as the identity: ``.logits`` are then the last hidden states at
    the kept positions. The forward still runs through DDP's wrapper (its gradient hooks), and the frozen
    lm_head has no gradient to synchronise."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    lm_head = base.get_output_embeddings()
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        base.set_output_embeddings(lm_head)


def _kept_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions t whose next token some row of the batch trains (at least one, see below)."""
    if labels.device.type != "cpu":
        raise ValueError("pass the CPU labels (finding the kept positions on a GPU syncs)")
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing trained here: still run forward/backward so DDP's ranks stay in step
        keep = torch.zeros(1, dtype=torch.long)
    return keep


def next_token_logits(
    model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, float_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)``: fp32 logits ``(batch * kept, vocab)`` at the kept positions t and the label at
    t + 1 there (IGNORE_INDEX where that row does not train it), on the model's device. Training's loss and
    evaluation's loss and accuracy both start here, so they mask and shift the same way.

    Logits are computed only at the positions whose next token is trained in some row of the batch
    (``logits_to_keep``): the 152k-wide vocabulary projection of the prompt tokens is never materialised.
    ``labels`` are the batch's labels on the CPU: the kept positions (a data-dependent ``nonzero``) are found
    there, so no micro-batch waits for the GPU to report them; only the index and the targets are copied over.
    """
    device = inputs["input_ids"].device
    targets = labels[:, 1:]
    keep = _kept_positions(labels)
    kept_targets = targets[:, keep].reshape(-1)
    if device.type == "cuda":  # a copy from pageable memory would wait for the queued GPU work
        keep, kept_targets = keep.pin_memory(), kept_targets.pin_memory()
    kept_targets = kept_targets.to(device, non_blocking=True)
    logits = model(**inputs, logits_to_keep=keep.to(device, non_blocking=True), use_cache=False).logits
    logits = logits.float() if float_logits else logits
    return logits.reshape(-1, logits.shape[-1]), kept_targets  # (batch * kept, vocab), (batch * kept)


def run_window(
    model: torch.nn.Module,
    window: list[dict[str, Any]],
    dist: Dist,
    to_inputs: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], Any] = nullcontext,
) -> tuple[float, int, int]:
    """Forward + backward over one accumulation window (this rank's micro-batches); gradients are
    synchronised on the last micro-batch only. Returns (mean token loss over all ranks, trained tokens, rows)
    of the whole window on all ranks (rows: dataset rows, so a packed sequence counts the rows it holds)."""
    tokens = int(dist.sum(sum(batch["trained_tokens"] for batch in window)).item())
    scale = dist.world_size / max(tokens, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)  # exact enough to compare runs
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            inputs = to_inputs(batch)
            with autocast():
                ce = token_loss_sum(model, inputs, batch["labels"])  # CPU labels: no device sync
            (ce * scale).backward()
        loss_sum += ce.detach().double()
    rows = torch.tensor(float(sum(len(batch["rows"]) for batch in window)), dtype=torch.float64)
    total_loss, total_rows = dist.sum(torch.stack([loss_sum, rows.to(loss_sum.device)])).tolist()
    return total_loss / max(tokens, 1), tokens, int(total_rows)


# ------------------------------------------------------------------------------------------- optimizer


def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based), as transformers'
    ``get_{cosine,linear,constant}_schedule_with_warmup``: linear from 0 over ``warmup`` steps, then
    cosine to 0 / linear to 0 / constant over the rest."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(
    model: torch.nn.Module, cfg: Any, warmup_steps: int, total_steps: int
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable (LoRA) weights and the warmup + decay schedule of ``cfg`` (a TrainConfig).
    Returns (trainable parameters, optimizer, scheduler)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=trainable[0].device.type == "cuda" if trainable else False,
    )
    schedule = functools.partial(
        lr_factor, warmup=warmup_steps, total=total_steps, kind=cfg.lr_scheduler_type
    )
    return trainable, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
