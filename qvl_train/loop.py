"""The training loop, start to end in one file (nanoGPT style).

    setup (torchrun env -> DDP)  ->  shards (+ held-out split) + plan  ->  model + LoRA  ->  AdamW + warmup/cosine
    ->  for each optimizer step: take the step's micro-batches, count their trained tokens on all ranks,
        forward/backward each (gradient sync on the last only), clip, step, log, evaluate, checkpoint
    ->  adapter + log + plot in output_dir

The pieces it is made of live where evaluation, generation and the benchmarks use them too: ranks and DDP in
:mod:`qvl_train.distributed`, the loader, model inputs, loss (and its normalisation) and optimizer in
:mod:`qvl_train.steps`, checkpoints and the start decision in :mod:`qvl_train.checkpoint`, held-out
evaluation in :mod:`qvl_train.evaluate`, and with --packing the packs, their sampler and collate in
:mod:`qvl_train.packing`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qvl_data.errors import QvlError
from qvl_train.checkpoint import (
    LOG_FILE,
    PLAN_FILE,
    PLOT_FILE,
    append_jsonl,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    seed_everything,
    truncate_jsonl,
    write_json,
)
from qvl_train.config import TrainConfig, to_dict
from qvl_train.data import RankBatchSampler, ShardDataset, collate, split_rows
from qvl_train.distributed import Dist, setup_distributed, teardown_distributed, wrap_ddp
from qvl_train.evaluate import eval_set_identity, evaluate, make_eval_loader
from qvl_train.model import (
    TINY,
    check_compatible,
    load_model,
    meta_model,
    model_config,
    model_dtype,
    param_report,
    tiny_model_dir,
)
from qvl_train.packing import PackedBatchSampler, PackedCollate, PackedDataset, attention_kind
from qvl_train.plan import Plan, make_plan
from qvl_train.steps import autocast_for, input_builder, make_loader, make_optimizer, run_window

# ------------------------------------------------------------------------------------------------ logs


def plot_loss(out_dir: Path) -> Path | None:
    """training_loss.png: the logged loss (raw and exponentially smoothed) and eval loss against the step."""
    records = []
    if (out_dir / LOG_FILE).is_file():
        records = [
            json.loads(line) for line in (out_dir / LOG_FILE).read_text(encoding="utf-8").splitlines() if line
        ]
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = zip(*points, strict=True)
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(losses))) - 0.5)  # LLaMA-Factory's smoothing weight
    smoothed, last = [], losses[0]
    for value in losses:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(steps, losses, color="#1f77b4", alpha=0.4, label="loss")
    ax.plot(steps, smoothed, color="#1f77b4", label="smoothed")
    if evals:
        ax.plot(*zip(*evals, strict=True), color="#ff7f0e", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {out_dir}")
    ax.legend()
    figure.tight_layout()
    path = out_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    return path


def train_line(record: dict[str, Any]) -> str:
    """The console line of a training log record."""
    return (
        f"step {record['step']}/{record['total_steps']}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
        f"lr {record['lr']:.3e}  grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
        f"{record['samples_per_s']:.2f} samples/s  elapsed {_hms(record['elapsed_s'])}  eta {_hms(record['eta_s'])}"
    )


def eval_line(record: dict[str, Any]) -> str:
    """The console line of an evaluation log record."""
    return (
        f"eval step {record['step']}/{record['total_steps']}  eval_loss {record['eval_loss']:.4f}  "
        f"eval_accuracy {record['eval_accuracy']:.4f}  ({record['eval_tokens']:,} tokens, "
        f"{record['eval_rows']:,} rows, {record['eval_s']:.1f} s)"
    )


# ----------------------------------------------------------------------------------------------- plan


def plan_table(plan: Plan, params: dict[str, Any], cfg: TrainConfig, eval_rows: int = 0):
    from rich.table import Table

    table = Table(title="qvl-train plan", show_header=False, title_justify="left")
    rows = [
        ("rows", _rows_text(plan)),
        *_eval_rows(cfg, eval_rows),
        ("world size", str(plan.world_size)),
        ("batches per rank and epoch", f"{plan.per_rank_batches:,} (batch {plan.batch_size})"),
        ("optimizer steps per epoch", f"{plan.steps_per_epoch:,} (accumulation {plan.grad_accum})"),
        ("total optimizer steps", f"{plan.total_steps:,} ({plan.epochs:g} epochs)"),
        ("warmup steps", f"{plan.warmup_steps:,}"),
        ("effective batch", f"{plan.effective_batch:,}"),
        ("learning rate", f"{cfg.learning_rate:g} {cfg.lr_scheduler_type}"),
        ("trainable params", f"{params['trainable']:,} ({params['percent']:.4f}%)"),
        ("all params", f"{params['total']:,}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _rows_text(plan: Plan) -> str:
    if plan.packing_len:  # the batches below count packed sequences
        return f"{plan.packed_rows:,} in {plan.rows:,} packed sequences of <= {plan.packing_len:,} tokens"
    return f"{plan.rows:,}"


def _eval_rows(cfg: TrainConfig, eval_rows: int) -> list[tuple[str, str]]:
    """The plan table's evaluation lines: which rows, and when."""
    if cfg.eval_data:
        rows = f"{eval_rows:,} ({cfg.eval_data})"
    elif cfg.val_size:
        rows = f"{eval_rows:,} held out of the rows (val_size {cfg.val_size:g})"
    else:
        return [("eval rows", "none")]
    every = f"every {cfg.eval_steps:,} steps and at the end" if cfg.eval_steps else "at the end"
    return [("eval rows", rows), ("evaluation", every)]


# ------------------------------------------------------------------------------------------------ setup


def setup_eval(cfg: TrainConfig) -> tuple[list[int] | None, ShardDataset | None]:
    """``(training rows of --data or None for all, evaluation set or None)``: --val-size holds rows of --data
    out by their id (:func:`qvl_train.data.split_rows`: the same split on every rank, world size and resume);
    --eval-data is a whole separate build (checked against the model's config)."""
    if cfg.eval_data:
        eval_set = ShardDataset(cfg.eval_data)
        check_compatible(model_config(cfg.model), eval_set.processor, cfg.model)
        return None, eval_set
    if cfg.val_size:
        train_rows, val_rows = split_rows(cfg.data, cfg.val_size, cfg.seed, cfg.max_rows)
        return train_rows, ShardDataset(cfg.data, rows=val_rows)
    if cfg.eval_steps:
        raise QvlError(
            "eval_steps needs an evaluation set: --val-size (rows held out of --data) or --eval-data"
        )
    return None, None


def setup_data(
    cfg: TrainConfig, world_size: int, rows: list[int] | None = None
) -> tuple[ShardDataset | PackedDataset, Plan]:
    """The training shards (checked against the model's config; only ``rows`` of them when given, the
    training side of :func:`setup_eval`) and the step plan for ``world_size`` ranks. With --packing, the
    packs of those rows (:class:`qvl_train.packing.PackedDataset`), and the plan counts packed sequences."""
    dataset: ShardDataset | PackedDataset = ShardDataset(cfg.data, cfg.max_rows, rows=rows)
    check_compatible(model_config(cfg.model), dataset.processor, cfg.model)
    packing_len = packed_rows = 0
    if cfg.packing:
        attention_kind(cfg.attn_implementation)  # an unsupported kernel fails here, dry run included
        dataset = PackedDataset(dataset, cfg.packing_len, cfg.seed)
        packing_len, packed_rows = dataset.packing_len, dataset.num_rows
    plan = make_plan(
        len(dataset),
        world_size,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.num_train_epochs,
        cfg.max_steps,
        cfg.warmup_ratio,
        cfg.warmup_steps,
        packing_len=packing_len,
        packed_rows=packed_rows,
    )
    return dataset, plan


def setup_model(cfg: TrainConfig, dist: Dist) -> tuple[Any, torch.dtype]:
    """Seed, then load the base model with LoRA on this rank's device (the tiny model is built once per
    machine before the other ranks read it). Returns (model, base-weight dtype)."""
    if cfg.model == TINY:
        if dist.local_rank == 0:
            tiny_model_dir()
        dist.barrier()
    seed_everything(cfg.seed)
    dtype = model_dtype(cfg, dist.device)
    return load_model(cfg, dist.device, dtype), dtype


def setup_loader(
    cfg: TrainConfig, dataset: ShardDataset | PackedDataset, dist: Dist
) -> tuple[RankBatchSampler | PackedBatchSampler, torch.utils.data.DataLoader]:
    """This rank's batch sampler (its state is what a checkpoint records) and the data loader over it: rows,
    or with --packing whole packs collated with their per-row positions and mask."""
    sampler_type = PackedBatchSampler if cfg.packing else RankBatchSampler
    sampler = sampler_type(
        len(dataset), cfg.per_device_train_batch_size, dist.rank, dist.world_size, cfg.seed
    )
    collate_fn = PackedCollate(model_config(cfg.model), cfg.attn_implementation) if cfg.packing else collate
    return sampler, make_loader(
        dataset, sampler, dist.device, cfg.dataloader_num_workers, cfg.seed, collate_fn
    )


def training_progress(console: Any, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


# ------------------------------------------------------------------------------------------------ run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) the training; returns a summary. QvlError for user errors."""
    dist = setup_distributed(cfg)
    try:
        return _train(cfg, dist)
    finally:
        teardown_distributed()


def _train(cfg: TrainConfig, dist: Dist) -> dict[str, Any]:
    from rich.console import Console

    console = Console(highlight=False, quiet=not dist.main)
    if cfg.world_size and not cfg.dry_run and cfg.world_size != dist.world_size:
        raise QvlError(
            f"world_size {cfg.world_size} requested but torchrun started {dist.world_size} process(es)"
        )
    train_rows, eval_set = setup_eval(cfg)
    dataset, plan = setup_data(
        cfg, cfg.world_size if cfg.dry_run and cfg.world_size else dist.world_size, train_rows
    )
    eval_rows = len(eval_set) if eval_set is not None else 0
    if cfg.dry_run:
        params = param_report(meta_model(cfg, model_config(cfg.model)))
        console.print(plan_table(plan, params, cfg, eval_rows))
        return {"plan": plan.to_dict(), "params": params, "eval_rows": eval_rows}

    # ---- output dir, model, optimizer
    out = Path(cfg.output_dir)
    eval_identity = eval_set_identity(eval_set, cfg.val_size, cfg.eval_data)
    # a refused resume (another plan, seed or evaluation set) raises here, before any write
    resume = prepare_output_dir(cfg, plan, dist, eval_identity)
    model, dtype = setup_model(cfg, dist)
    params = param_report(model)
    console.print(plan_table(plan, params, cfg, eval_rows))
    trainable, optimizer, scheduler = make_optimizer(model, cfg, plan.warmup_steps, plan.total_steps)

    # ---- resume
    step, elapsed_before = 0, 0.0
    pending = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "seconds": 0.0}
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, scheduler, dist)  # check_resume passed
        step, elapsed_before, pending = state["step"], state["elapsed_s"], state["pending"]
        epoch, first, _ = plan.micro_batches(step)
        if dist.main:
            truncate_jsonl(out / LOG_FILE, step)
            console.print(f"resumed from {resume} at step {step} (epoch {epoch}, batch {first})")
        if cfg.log_samples:
            truncate_jsonl(out / f"samples-rank{dist.rank}.jsonl", step)

    if dist.main:  # after the resume loaded: a refused resume leaves the old plan.json in place
        write_json(
            out / PLAN_FILE,
            {"plan": plan.to_dict(), "params": params, "eval_rows": eval_rows, "config": to_dict(cfg)},
        )

    # ---- data
    sampler, loader = setup_loader(cfg, dataset, dist)
    to_inputs = input_builder(dist.device, dtype, dataset.processor)
    autocast = autocast_for(dist.device, dtype)
    ddp = wrap_ddp(model, dist) if dist.world_size > 1 else model
    eval_loader, eval_inputs = None, None
    if eval_set is not None:  # its own loader and generator: evaluating never moves the training stream
        eval_loader = make_eval_loader(
            eval_set, cfg.per_device_eval_batch_size, dist, cfg.dataloader_num_workers
        )
        eval_inputs = input_builder(dist.device, dtype, eval_set.processor)  # an --eval-data build's own

    # ---- loop
    stop = min(plan.total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else plan.total_steps
    start_step, run_start, interval_start = step, time.perf_counter(), time.perf_counter()
    last_record: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    samples_file = out / f"samples-rank{dist.rank}.jsonl"
    model.train()
    progress = training_progress(console, dist.main)
    task = progress.add_task("steps", total=plan.total_steps, completed=step)
    iterator, iterator_epoch = None, None
    with progress:
        while step < stop:
            epoch, first, count = plan.micro_batches(step)
            if iterator_epoch != epoch:
                sampler.set_epoch(epoch, first)
                iterator, iterator_epoch = iter(loader), epoch
            window = [next(iterator) for _ in range(count)]
            if cfg.log_samples:
                append_jsonl(samples_file, _sample_records(window, step + 1, epoch, dist.rank))
            lr = scheduler.get_last_lr()[0]
            loss, tokens, rows = run_window(ddp, window, dist, to_inputs, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.advance(task)

            now = time.perf_counter()
            pending["loss"] += loss
            pending["steps"] += 1
            pending["tokens"] += tokens
            pending["samples"] += rows
            if step % cfg.logging_steps == 0 or step == plan.total_steps:
                seconds = pending["seconds"] + now - interval_start
                elapsed = elapsed_before + now - run_start
                record = {
                    "step": step,
                    "total_steps": plan.total_steps,
                    "epoch": round(step / plan.steps_per_epoch, 4),
                    "loss": pending["loss"] / pending["steps"],
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "trained_tokens": pending["tokens"],
                    "tokens_per_s": pending["tokens"] / max(seconds, 1e-9),
                    "samples_per_s": pending["samples"] / max(seconds, 1e-9),
                    "elapsed_s": round(elapsed, 3),
                    "eta_s": round((now - run_start) / (step - start_step) * (plan.total_steps - step), 3),
                }
                if dist.main:
                    append_jsonl(out / LOG_FILE, [record])
                    progress.console.print(train_line(record), soft_wrap=True)
                last_record = record
                pending = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "seconds": 0.0}
                interval_start = now

            at_end = step == plan.total_steps
            # before the checkpoint: a resume from checkpoint-N never redoes (or re-logs) step N's evaluation
            if eval_loader is not None and (at_end or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0)):
                evaluating = time.perf_counter()
                # the model, not DDP's wrapper: a forward outside DDP leaves its reducer state alone
                result = evaluate(model, eval_loader, dist, eval_inputs, autocast)
                seconds = time.perf_counter() - evaluating
                last_eval = {
                    "step": step,
                    "total_steps": plan.total_steps,
                    "epoch": round(step / plan.steps_per_epoch, 4),
                    **result,
                    "eval_s": round(seconds, 3),
                }
                if dist.main:
                    append_jsonl(out / LOG_FILE, [last_eval])
                    progress.console.print(eval_line(last_eval), soft_wrap=True)
                interval_start += seconds  # throughput excludes evaluation
            if (cfg.save_steps > 0 and step % cfg.save_steps == 0) or at_end or step == stop:
                pending_now = {
                    **pending,
                    "seconds": pending["seconds"] + time.perf_counter() - interval_start,
                }
                next_epoch, next_first, _ = plan.micro_batches(step)
                state = {
                    "step": step,
                    "data": {"epoch": next_epoch, "batches_done": next_first},
                    "world_size": dist.world_size,
                    "seed": cfg.seed,
                    "plan": plan.to_dict(),
                    "elapsed_s": elapsed_before + time.perf_counter() - run_start,
                    "pending": pending_now,
                    "eval_set": eval_identity,
                    "config": to_dict(cfg),
                }
                saving = time.perf_counter()
                save_checkpoint(out, step, model, optimizer, scheduler, state, dist, cfg.save_total_limit)
                if dist.main and cfg.plot_loss:
                    plot_loss(out)
                interval_start += time.perf_counter() - saving  # throughput excludes checkpointing

    # ---- final output
    finished = step >= plan.total_steps
    if finished and dist.main:
        model.save_pretrained(out, safe_serialization=True)
        if cfg.plot_loss:
            plot_loss(out)
    dist.barrier()
    elapsed = elapsed_before + time.perf_counter() - run_start
    console.print(
        f"{'done' if finished else 'stopped'} at step {step}/{plan.total_steps} in {_hms(elapsed)}; "
        f"{'adapter' if finished else 'checkpoint'} in {out}"
    )
    return {
        "plan": plan.to_dict(),
        "params": params,
        "step": step,
        "finished": finished,
        "last_log": last_record,
        "last_eval": last_eval,
    }


def _sample_records(window: list[dict[str, Any]], step: int, epoch: int, rank: int) -> list[dict[str, Any]]:
    """What --log-samples appends: which rows this rank trained on at this step."""
    return [
        {"step": step, "epoch": epoch, "rank": rank, "row": row, "source": source, "index": index}
        for batch in window
        for row, source, index in batch["rows"]
    ]


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
