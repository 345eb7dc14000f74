"""Benchmark 4 (GPU, when one is lent): the Qwen2.5-VL-7B LoRA step, qvl_train's step vs transformers.Trainer.

    python bench/gpu_step.py              # one H100 / H200: ~2-4 min, < 8 min
    python bench/gpu_step.py --smoke      # CPU, tiny config, seconds (CI)

Needs qvl installed (its own dependencies; no download, no weights). The model is the product's: the
benchmark builds nothing of its own but the random weights.

* the Qwen2.5-VL-7B-Instruct architecture from its config dict (8,292,166,656 parameters, checked), built on
  the meta device and materialised with random bf16 weights on the GPU (``qvl_train.model.random_base``:
  ``to_empty`` + ``init_weights``), then made trainable by ``qvl_train.model.trainable_model``, the second
  half of ``load_model``: LoRA as docs/semantics.md section 7 (r 8, alpha 16, dropout 0.1, the 196
  language-model linears, 20,185,088 trainable, fp32; the input-embedding grad hooks dropped, so the frozen
  vision tower runs no backward), non-reentrant checkpointing, SDPA attention;
* two configurations (``--checkpointing``): non-reentrant gradient checkpointing on (the trainer's default)
  and off (activations kept: faster, and at seq 2048 the 7B LoRA step fits in 80 GB without it);
* one row of ``--seq-len`` 2048 tokens holding one 448x448 image (grid 1x32x32: 1024 patches, 256 image
  tokens), the answer (``--trained-fraction`` of the text tokens) trained, micro-batch 1;
* ``qvl``: ``qvl_train``'s own pieces (``collate``, ``to_device`` with the uint8 -> float expansion on the
  GPU, ``run_window`` = forward with ``logits_to_keep`` + sum-of-token loss + backward, clip, fused AdamW);
* ``HF Trainer``: ``transformers.Trainer`` (bf16, fused AdamW, same clip) on the same model and row, float32
  ``pixel_values`` from the collator, the model's own loss over full logits. Pinned to one GPU: on a host
  with several visible GPUs the Trainer would wrap the model in ``DataParallel`` (other work, other memory);
  the benchmark also makes only the first visible GPU visible before CUDA starts.
* packing (``--packing on``, the default; with the first ``--checkpointing`` configuration): ``--seq-len //
  --short-len`` short rows (8 rows of 256 tokens, one 224x224 image each: 64 image tokens; the demo set
  averages 173 tokens a row) per optimizer step, run one row per micro-batch with accumulation over the rows
  (SDPA: what an unpacked run does) and as one packed sequence, accumulation 1 (``qvl_train.packing``), with
  flash-attention's varlen kernel when flash-attn is installed, else SDPA with the block-diagonal mask. Same
  rows, tokens and trained tokens per step, so the ratio of seconds per step is the gain of packing.

Reported: seconds per optimizer step, tokens/s, model FLOPs utilisation and peak GPU memory. Model FLOPs
(recomputation from gradient checkpointing is *not* counted; the vision tower is frozen and gets no
backward: nothing in it is trained and no hook makes its input require a gradient, which
``tests/test_model.py`` checks on the tiny model)::

    language model  (4 * N_frozen_linear + 6 * N_lora) * T  +  3 * 2 * L * T^2 * d   (causal attention)
    lm_head         4 * N_lm_head * K    (K = trained positions: the only logits the loss needs)
    vision tower    2 * N_vision * P + sum over blocks of 4 * P * S * d_v   (S = window or all P patches)
    merger          2 * N_merger * P / 4

    MFU = model FLOPs per step / (seconds per step * peak dense bf16 FLOP/s of the card)

(packing: the model FLOPs of each short row, times the rows; a packed step does no more useful work)
with peak 989 TFLOP/s for H100 SXM, H200 SXM and GH200, 835 for H100 NVL and H200 NVL, 756 for H100 PCIe
(``--peak-tflops`` overrides).

Not yet run on a GPU (no session of this project has had one); ``--smoke`` runs the same code on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import common
from bench.common import fmt, fmt_bytes, fmt_ratio, ratio
from qvl_data.processor import IM_END_ID, IM_START_ID, IMAGE_PAD_ID, PAD_ID, VISION_END_ID, VISION_START_ID
from qvl_data.template import IGNORE_INDEX

NAME = "gpu_step"
TARGET_MFU = 0.40
EXPECTED_7B_PARAMS = 8_292_166_656
EXPECTED_7B_LORA = 20_185_088

#: config.json of Qwen/Qwen2.5-VL-7B-Instruct (the architecture only; no weights are needed).
QWEN25_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": PAD_ID,
    "eos_token_id": IM_END_ID,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "image_token_id": IMAGE_PAD_ID,
    "video_token_id": 151656,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
    "vision_token_id": 151654,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

#: Dense bf16 peak (no sparsity) by device-name fragment, most specific first, in FLOP/s.
PEAK_BF16 = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("H200 NVL", 835e12),  # the PCIe card: lower clocks and power than the SXM H200
    ("GH200", 989e12),
    ("H200", 989e12),  # SXM ("H200")
    ("A100", 312e12),
)


# ---------------------------------------------------------------------------------------------- model


def model_config(smoke: bool):
    from transformers import Qwen2_5_VLConfig

    if smoke:
        from qvl_train.model import tiny_config

        return tiny_config()
    return Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B)


def build_model(config, device, dtype, gradient_checkpointing: bool = True):
    """The trainable model as ``qvl_train.model.load_model`` makes it (``trainable_model``: no KV cache,
    non-reentrant checkpointing, qvl's LoRA of docs/semantics.md section 7: 196 language-model linears,
    r 8, alpha 16, fp32), on the random weights of ``qvl_train.model.random_base`` instead of a checkpoint.
    Returns (model, base parameter count, how the weights were initialised)."""
    from qvl_train.config import TrainConfig
    from qvl_train.model import random_base, trainable_model

    base, how = random_base(config, device, dtype)
    base_params = sum(p.numel() for p in base.parameters())
    model = trainable_model(base, TrainConfig(gradient_checkpointing=gradient_checkpointing))
    return model, base_params, how


def set_checkpointing(model, on: bool) -> None:
    """Switch between the checkpointing configurations (``qvl_train.model.set_gradient_checkpointing``)."""
    from qvl_train.model import set_gradient_checkpointing

    set_gradient_checkpointing(model, on)


# ----------------------------------------------------------------------------------------------- data


def make_row(seq_len: int, image_side: int, trained_fraction: float, seed: int = 0) -> dict[str, Any]:
    """One training row as ``qvl_train.data.ShardDataset`` returns it: system + user(image + text) +
    answer, random text ids, random uint8 patches of one ``image_side`` x ``image_side`` image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    grid = (1, image_side // 14, image_side // 14)
    patches = grid[0] * grid[1] * grid[2]
    image_tokens = patches // 4
    newline, system, user, assistant = 198, 8948, 872, 77091  # "\n", "system", "user", "assistant"
    default_system = [2610, 525, 264, 10950, 17847, 13]  # "You are a helpful assistant."
    head = [IM_START_ID, system, newline, *default_system, IM_END_ID, newline, IM_START_ID, user, newline]
    image = [VISION_START_ID] + [IMAGE_PAD_ID] * image_tokens + [VISION_END_ID]
    tail = [IM_END_ID, newline, IM_START_ID, assistant, newline]  # <|im_end|>\n<|im_start|>assistant\n
    text = seq_len - len(head) - len(image) - len(tail) - 2  # 2: the answer's <|im_end|>\n
    if text < 2:
        raise ValueError(f"seq_len {seq_len} too short for a {image_side}px image ({image_tokens} tokens)")
    answer = max(1, int(text * trained_fraction))
    question = text - answer
    rand = lambda n: torch.randint(1000, 150000, (n,), generator=g).tolist()  # noqa: E731
    prompt = head + image + rand(question) + tail
    target = rand(answer) + [IM_END_ID, newline]
    ids = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    return {
        "row": 0,
        "source": "synthetic",
        "index": 0,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "image_grid_thw": torch.tensor([grid], dtype=torch.long),
        "pixels": torch.randint(0, 256, (patches, 588), dtype=torch.uint8, generator=g),
    }


@functools.cache
def processor_summary():
    """What the manifest of a build with the embedded processor records about it (what to_device needs):
    the build's own ``processor_task``, so normalisation and geometry are the product's."""
    from qvl_data.format import ProcessorSummary
    from qvl_data.task import processor_task

    return ProcessorSummary(**processor_task(None))


# ---------------------------------------------------------------------------------------------- flops


def model_flops(model, config, seq_len: int, patches: int, trained: int) -> dict[str, float]:
    """Model FLOPs of one micro-batch (see the module docstring)."""
    import torch

    lm_linear = lora = vision = merger = head = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or isinstance(module, torch.nn.Conv3d):
            weight = module.weight.numel()
            if "lora_" in name:
                lora += weight
            elif "lm_head" in name:
                head += weight
            elif "language_model" in name:
                lm_linear += weight
            elif "merger" in name:
                merger += weight
            elif "visual" in name:
                vision += weight
    text = config.text_config
    d = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    attn_lm = 3 * 2 * text.num_hidden_layers * seq_len**2 * d  # fwd 2*T^2*d per layer (causal), x3 train
    v = config.vision_config
    window = (v.window_size // v.spatial_merge_size // v.patch_size) ** 2 * v.spatial_merge_size**2
    full = set(v.fullatt_block_indexes)
    attn_v = sum(
        4 * patches * (patches if i in full else min(window, patches)) * v.hidden_size for i in range(v.depth)
    )
    parts = {
        "language_model": (4 * lm_linear + 6 * lora) * seq_len + attn_lm,
        "lm_head": 4 * head * trained,
        "vision": 2 * vision * patches + attn_v,
        "merger": 2 * merger * patches / 4,
    }
    parts["total"] = sum(parts.values())
    parts["params"] = {
        "lm_linear": lm_linear,
        "lora": lora,
        "lm_head": head,
        "vision": vision,
        "merger": merger,
    }
    return parts


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for fragment, value in PEAK_BF16:
        if fragment in device_name:
            return value
    return None


# ---------------------------------------------------------------------------------------------- steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> dict[str, int | None]:
    import torch

    if device.type != "cuda":
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def run_qvl(model, row, args, device, dtype) -> dict[str, Any]:
    """qvl_train.loop's optimizer step, from the same pieces: collate -> batch_to_inputs -> run_window -> clip
    -> AdamW."""
    from qvl_train.data import collate

    return time_qvl_steps(
        model, lambda: [collate([row]) for _ in range(args.grad_accum)], args, device, dtype
    )


def time_qvl_steps(model, make_window, args, device, dtype) -> dict[str, Any]:
    """Times ``--warmup-steps`` + ``--steps`` optimizer steps of qvl_train's pieces over the micro-batches
    ``make_window()`` collates for each step (the loader's work, timed with the step)."""
    import torch

    from qvl_train.distributed import Dist
    from qvl_train.steps import autocast_for, input_builder, run_window

    _reset_memory(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    dist = Dist(device=device)
    to_inputs = input_builder(device, dtype, processor_summary())
    autocast = autocast_for(device, dtype)

    model.train()
    times, losses = [], []
    for _ in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        window = make_window()
        loss, _tokens, _rows = run_window(model, window, dist, to_inputs, autocast)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    memory = _peak_memory(device)
    del optimizer
    return {"step_s": times, "losses": losses, **memory}


def run_hf(model, row, args, device, dtype) -> dict[str, Any]:
    """transformers.Trainer on the same model and row: float32 pixel_values from the collator, full logits."""
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from qvl_data.vision import pixel_values_from_uint8_torch
    from qvl_train.steps import model_takes_token_types

    hf_logging.set_verbosity_error()
    _reset_memory(device)
    p = processor_summary()
    pixel_values = pixel_values_from_uint8_torch(
        row["pixels"], p.image_mean, p.image_std, p.rescale_factor, p.temporal_patch_size
    )
    mm_types = model_takes_token_types()
    item = {
        "input_ids": row["input_ids"],
        "attention_mask": torch.ones_like(row["input_ids"]),
        "labels": row["labels"],
        "pixel_values": pixel_values,
        "image_grid_thw": row["image_grid_thw"],
    }
    if mm_types:
        item["mm_token_type_ids"] = (row["input_ids"] == IMAGE_PAD_ID).int()
    total = (args.warmup_steps + args.steps) * args.grad_accum

    def collator(items):
        batch = {k: torch.stack([x[k] for x in items]) for k in ("input_ids", "attention_mask", "labels")}
        batch["pixel_values"] = torch.cat([x["pixel_values"] for x in items])
        batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in items])
        if mm_types:
            batch["mm_token_type_ids"] = torch.stack([x["mm_token_type_ids"] for x in items])
        return batch

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            _sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            _sync(device)
            marks.append(time.perf_counter())

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="qvl-bench-gpu-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.warmup_steps + args.steps,
            learning_rate=1e-4,
            max_grad_norm=1.0,
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            bf16=cuda and dtype == torch.bfloat16,
            use_cpu=not cuda,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_pin_memory=cuda,
        )
        if cuda:
            _ = targs.device  # sets up the devices (and n_gpu = every visible GPU) now, so that ...
            targs._n_gpu = 1  # ... this sticks: no DataParallel over the other GPUs of the host
        trainer = Trainer(
            model=model, args=targs, train_dataset=[item] * total, data_collator=collator, callbacks=[Clock()]
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        memory = _peak_memory(device)
        wrapped = type(trainer.model_wrapped).__name__
        del trainer
    if wrapped == "DataParallel":
        raise SystemExit("HF Trainer wrapped the model in DataParallel: the baseline must run on one GPU")
    return {
        "step_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "losses": losses,
        "trainer_model": wrapped,
        **memory,
    }


# -------------------------------------------------------------------------------------------- packing


def packing_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The short rows of the packing comparison: ``--seq-len // --short-len`` rows of ``--short-len`` tokens
    with one ``--short-image-side`` image each (different random ids and pixels per row)."""
    count = args.seq_len // args.short_len
    return [
        make_row(args.short_len, args.short_image_side, args.trained_fraction, seed=1 + i)
        for i in range(count)
    ]


def packed_attention(smoke: bool) -> str:
    """flash_attention_2 (the varlen path: no mask) when flash-attn is importable on a GPU, else SDPA with
    the block-diagonal mask."""
    import importlib.util

    return "flash_attention_2" if not smoke and importlib.util.find_spec("flash_attn") else "sdpa"


def set_attention(model, name: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


def run_packing(model, config, args, device, dtype, peak) -> dict[str, Any]:
    """The same short rows per optimizer step, (a) one row per micro-batch with accumulation over the rows
    (SDPA, what an unpacked run does) and (b) all of them in one packed sequence, accumulation 1
    (qvl_train.packing.PackedCollate, flash varlen when available). Same rows, tokens and trained tokens
    per step, so s/step compares directly."""
    from qvl_train.data import collate
    from qvl_train.packing import PackedCollate

    rows = packing_rows(args)
    patches = int(rows[0]["image_grid_thw"].prod())
    trained = sum(int((r["labels"][1:] != IGNORE_INDEX).sum()) for r in rows)
    # model FLOPs per row (attention within the row only), times the rows: the packed step does this work
    flops = model_flops(model, config, args.short_len, patches, trained // len(rows))["total"] * len(rows)
    attn = packed_attention(args.smoke)
    configurations = (
        ("rows one by one", "sdpa", lambda: [collate([r]) for r in rows]),
        ("packed", attn, lambda: [PackedCollate(config, attn)([rows])]),
    )
    results = []
    for name, impl, make_window in configurations:
        print(
            f"[gpu_step] packing: {name}, {impl}, {len(rows)} rows of {args.short_len} tokens ...", flush=True
        )
        set_attention(model, impl)
        try:
            r = time_qvl_steps(model, make_window, args, device, dtype)
        finally:
            set_attention(model, "sdpa")
        measured = r["step_s"][args.warmup_steps :] or r["step_s"]
        s = sum(measured) / len(measured)
        r.update(
            configuration=name,
            attention=impl,
            s_per_step=s,
            tokens_per_s=args.short_len * len(rows) / s,
            trained_tokens_per_s=trained / s,
            model_tflops_per_s=flops / s / 1e12,
            mfu=flops / s / peak if peak else None,
        )
        print(
            f"[gpu_step]   {s:.3f} s/step, {r['trained_tokens_per_s']:,.0f} trained tok/s, "
            f"peak {fmt_bytes(r['peak_allocated_bytes'])}",
            flush=True,
        )
        results.append(r)
    return {
        "rows": len(rows),
        "row_len": args.short_len,
        "image_tokens_per_row": patches // 4,
        "trained_tokens_per_step": trained,
        "attention": attn,
        "flops_per_step": flops,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------- main


def pin_one_gpu() -> None:
    """Make only the first visible GPU visible (before CUDA starts): both loops run on one device."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else "0"
    os.environ["CUDA_VISIBLE_DEVICES"] = first


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    if not args.smoke:
        pin_one_gpu()
    import torch

    info = common.machine_info()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    card = torch.cuda.get_device_name(device) if cuda else common.cpu_model()
    info.update(device=card, cuda=torch.version.cuda if cuda else None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    config = model_config(args.smoke)
    started = time.perf_counter()
    model, meta_params, how = build_model(config, device, dtype)
    report = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base": meta_params,
        "init": how,
    }
    build_s = time.perf_counter() - started
    print(f"[gpu_step] {card}: model built in {build_s:.0f} s, {report}", flush=True)
    if not args.smoke and (meta_params != EXPECTED_7B_PARAMS or report["trainable"] != EXPECTED_7B_LORA):
        raise SystemExit(
            f"unexpected parameter counts {report} (spec: {EXPECTED_7B_PARAMS}, {EXPECTED_7B_LORA})"
        )

    row = make_row(args.seq_len, args.image_side, args.trained_fraction)
    patches = int(row["image_grid_thw"].prod())
    trained = int((row["labels"][1:] != IGNORE_INDEX).sum())
    flops = model_flops(model, config, args.seq_len, patches, trained)
    peak = peak_flops(card, args.peak_tflops) if cuda or args.peak_tflops else None
    results = []
    for checkpointing in args.checkpointing:
        set_checkpointing(model, checkpointing)
        for name, fn in (("qvl", run_qvl), ("HF Trainer", run_hf)):
            if args.only and name not in args.only:
                continue
            results.append(
                run_loop(name, fn, model, row, args, device, dtype, checkpointing, trained, flops, peak)
            )
    packing = None
    if args.packing:  # with the first checkpointing configuration (the trainer's default: on)
        set_checkpointing(model, args.checkpointing[0])
        packing = {
            "checkpointing": args.checkpointing[0],
            **run_packing(model, config, args, device, dtype, peak),
        }
    return {
        "benchmark": NAME,
        "machine": info,
        "args": vars(args),
        "params": report,
        "flops_per_micro_batch": flops,
        "flops_formula": __doc__.split("Model FLOPs", 1)[1].split("with peak", 1)[0].strip(),
        "peak_flops": peak,
        "row": {
            "seq_len": args.seq_len,
            "patches": patches,
            "image_tokens": patches // 4,
            "trained_tokens": trained,
        },
        "build_s": build_s,
        "results": results,
        "packing": packing,
    }


def run_loop(
    name, fn, model, row, args, device, dtype, checkpointing, trained, flops, peak
) -> dict[str, Any]:
    """One loop in one configuration: its step times, throughput and MFU."""
    label = f"{name}, checkpointing {'on' if checkpointing else 'off'}"
    print(f"[gpu_step] {label} ...", flush=True)
    r = fn(model, row, args, device, dtype)
    measured = r["step_s"][args.warmup_steps :] or r["step_s"]
    s = sum(measured) / len(measured)
    r.update(
        loop=name,
        checkpointing=checkpointing,
        s_per_step=s,
        tokens_per_s=args.seq_len * args.grad_accum / s,
        trained_tokens_per_s=trained * args.grad_accum / s,
        model_tflops_per_s=flops["total"] * args.grad_accum / s / 1e12,
        mfu=flops["total"] * args.grad_accum / s / peak if peak else None,
    )
    print(
        f"[gpu_step]   {s:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s, MFU {fmt(100 * r['mfu'] if r['mfu'] else None)}%, "
        f"peak {fmt_bytes(r['peak_allocated_bytes'])}",
        flush=True,
    )
    return r


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Per checkpointing configuration: qvl's MFU, and qvl's step time against the HF Trainer's."""
    results, checks = payload["results"], []
    for checkpointing in sorted({r["checkpointing"] for r in results}, reverse=True):
        mine = [r for r in results if r["checkpointing"] == checkpointing]
        qvl = next((r for r in mine if r["loop"] == "qvl"), None)
        hf = next((r for r in mine if r["loop"] == "HF Trainer"), None)
        suffix = f", checkpointing {'on' if checkpointing else 'off'}"
        for r in mine:
            r["time_vs_qvl"] = ratio(r["s_per_step"], qvl["s_per_step"]) if qvl else None
        if qvl and qvl["mfu"] is not None:
            checks.append(
                {
                    "target": "qvl MFU, 7B LoRA step" + suffix,
                    "goal": f">= {TARGET_MFU:.0%}",
                    "measured": qvl["mfu"],
                    "met": qvl["mfu"] >= TARGET_MFU,
                }
            )
        if qvl and hf:
            x = ratio(qvl["s_per_step"], hf["s_per_step"])
            checks.append(
                {
                    "target": "qvl s/step / HF Trainer s/step" + suffix,
                    "goal": "< 1x",
                    "measured": x,
                    "met": (x or 9) < 1,
                }
            )
    packing = payload.get("packing")
    if packing and len(packing["results"]) == 2:
        unpacked, packed = packing["results"]
        x = ratio(unpacked["s_per_step"], packed["s_per_step"])
        checks.append(
            {
                "target": f"qvl s/step: {packing['rows']} rows one by one / the same rows packed "
                f"({packed['attention']})",
                "goal": "> 1x",
                "measured": x,
                "met": None if payload["args"]["smoke"] else (x or 0) > 1,  # CPU smoke: informational
            }
        )
    payload["checks"] = checks
    return payload


def packing_table_rows(packing: dict[str, Any]) -> list[list[str]]:
    """The packing table's rows, for the console here and the markdown of ``bench/report.py``."""
    return [
        [
            r["configuration"],
            r["attention"],
            fmt(r["s_per_step"], 3),
            fmt(r["tokens_per_s"], 0),
            fmt(r["trained_tokens_per_s"], 0),
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
            fmt_bytes(r["peak_allocated_bytes"]),
        ]
        for r in packing["results"]
    ]


def print_tables(payload: dict[str, Any]) -> None:
    a, row = payload["args"], payload["row"]
    rows = [
        [
            r["loop"],
            "on" if r["checkpointing"] else "off",
            len(r["step_s"]) - a["warmup_steps"],
            fmt(r["s_per_step"], 3),
            fmt(r["tokens_per_s"], 0),
            fmt(r["trained_tokens_per_s"], 0),
            fmt(r["model_tflops_per_s"], 1),
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
            fmt_bytes(r["peak_allocated_bytes"]),
            fmt_bytes(r["peak_reserved_bytes"]),
            fmt(r["losses"][-1], 3) if r["losses"] else "-",
            fmt_ratio(r.get("time_vs_qvl")),
        ]
        for r in payload["results"]
    ]
    m = payload["machine"]
    common.print_table(
        f"bench/gpu_step.py: {'tiny (smoke)' if a['smoke'] else 'Qwen2.5-VL-7B'} LoRA step on {m['device']}, seq "
        f"{row['seq_len']}, {row['patches']} patches, {row['trained_tokens']} trained, accumulation {a['grad_accum']}",
        [
            "loop",
            "checkpointing",
            "steps",
            "s / step",
            "tok/s",
            "trained tok/s",
            "model TFLOP/s",
            "MFU",
            "peak alloc",
            "peak reserved",
            "last loss",
            "time vs qvl",
        ],
        rows,
        common.caption(m) + f"; device {m['device']}",
    )
    packing = payload.get("packing")
    if packing:
        common.print_table(
            f"packing: {packing['rows']} rows of {packing['row_len']} tokens ({packing['image_tokens_per_row']} "
            f"image tokens each), {packing['trained_tokens_per_step']} trained tokens per optimizer step, "
            f"checkpointing {'on' if packing['checkpointing'] else 'off'}",
            ["configuration", "attention", "s / step", "tok/s", "trained tok/s", "MFU", "peak alloc"],
            packing_table_rows(packing),
        )
    if payload["checks"]:
        common.print_table(
            "targets",
            ["target", "goal", "measured", ""],
            [
                [
                    c["target"],
                    c["goal"],
                    fmt_ratio(c["measured"])
                    if c["target"].startswith("qvl s")
                    else f"{100 * c['measured']:.1f}%",
                    "-" if c["met"] is None else "met" if c["met"] else "MISSED",
                ]
                for c in payload["checks"]
            ],
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.bench_parser(NAME, __doc__, smoke_help="CPU, tiny config, seconds (CI)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--image-side", type=int, default=448, help="square image side in pixels (multiple of 28)"
    )
    parser.add_argument(
        "--trained-fraction", type=float, default=0.5, help="share of the text tokens in the answer"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per loop")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the card (default: by name)"
    )
    parser.add_argument("--only", help="comma-separated loops to run (qvl, HF Trainer)")
    parser.add_argument(
        "--checkpointing",
        default="on,off",
        help="comma-separated gradient-checkpointing configurations to run (on, off)",
    )
    parser.add_argument(
        "--packing",
        default="on",
        choices=["on", "off"],
        help="also time --seq-len // --short-len short rows one by one against the same rows packed",
    )
    parser.add_argument("--short-len", type=int, default=256, help="tokens per row of the packing comparison")
    parser.add_argument(
        "--short-image-side", type=int, default=224, help="image side of each short row (multiple of 28)"
    )
    args = parser.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x] if args.only else None
    args.packing = args.packing == "on"
    choices = {"on": True, "off": False}
    wanted = [x.strip() for x in args.checkpointing.split(",") if x.strip()]
    if not wanted or any(x not in choices for x in wanted):
        parser.error(f"--checkpointing: expected on, off or on,off, got {args.checkpointing!r}")
    args.checkpointing = [choices[x] for x in wanted]
    if args.smoke:
        args.seq_len, args.image_side, args.steps, args.warmup_steps = 96, 56, 1, 1
        args.short_len, args.short_image_side = 32, 28
    if args.packing and args.seq_len // args.short_len < 2:
        parser.error(f"--short-len {args.short_len}: fewer than two rows fit in --seq-len {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.bench_main(NAME, parse_args(argv), run_all, summarize, print_tables)


if __name__ == "__main__":
    main()
