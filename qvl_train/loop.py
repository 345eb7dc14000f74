"""The training recipe, start to end (torchtune / nanoGPT style): :func:`_train` reads top to bottom.

    setup (torchrun env -> DDP)  ->  shards (+ held-out split) + plan  ->  model + LoRA  ->  AdamW + warmup/cosine
    ->  for each optimizer step: take the step's micro-batches, count their trained tokens on all ranks,
        forward/backward each (gradient sync on the last only), clip, step, log, evaluate, checkpoint
    ->  adapter + log + plot in output_dir

The pieces it is made of live where evaluation, generation and the benchmarks use them too: ranks and DDP in
:mod:`qvl_train.distributed`, the step plan in :mod:`qvl_train.plan`, the loader, model inputs, loss (and its
normalisation) and optimizer in :mod:`qvl_train.steps`, the log window in :mod:`qvl_train.meter`, checkpoints,
the trainer state and the start decision in :mod:`qvl_train.checkpoint`, held-out evaluation in
:mod:`qvl_train.evaluate`, with --packing the packs, their sampler and collate in :mod:`qvl_train.packing`,
and what the run prints and plots in :mod:`qvl_train.report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvl_data.errors import QvlError
from qvl_data.files import append_jsonl
from qvl_data.format import Manifest
from qvl_data.shards import load_manifest
from qvl_train.checkpoint import (
    LOG_FILE,
    PLAN_FILE,
    TrainState,
    checkpoints,
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
from qvl_train.meter import Meter, position
from qvl_train.model import (
    TINY_MODELS,
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
from qvl_train.report import eval_line, hms, plan_table, plot_loss, train_line, training_progress
from qvl_train.steps import autocast_for, input_builder, make_loader, make_optimizer, run_window
from qvl_train.trackers import Trackers, open_trackers, parse_report_to

# ------------------------------------------------------------------------------------------------ setup


def setup_eval(cfg: TrainConfig, console: Any = None) -> tuple[list[int] | None, ShardDataset | None]:
    """``(training rows of --data or None for all, evaluation set or None)``: --val-size holds rows of --data
    out by their id (:func:`qvl_train.data.split_rows`: the same split on every rank, world size and resume);
    --eval-data is a whole separate build (checked against the model's config)."""
    if cfg.eval_data:
        eval_set = ShardDataset(cfg.eval_data, verify_images=cfg.verify_images)
        check_compatible(model_config(cfg.model), eval_set.processor, cfg.model, eval_set.manifest.family)
        differences = build_differences(load_manifest(Path(cfg.data)), eval_set.manifest)
        if differences and console is not None:
            console.print(
                f"warning: --eval-data {cfg.eval_data} was built with another {', '.join(differences)} than "
                f"--data {cfg.data}; its eval loss does not measure the rows the model trains on",
                soft_wrap=True,
            )
        return None, eval_set
    if cfg.val_size:
        train_rows, val_rows = split_rows(cfg.data, cfg.val_size, cfg.seed, cfg.max_rows)
        return train_rows, ShardDataset(cfg.data, rows=val_rows, verify_images=cfg.verify_images)
    if cfg.eval_steps:
        raise QvlError(
            "eval_steps needs an evaluation set: --val-size (rows held out of --data) or --eval-data"
        )
    return None, None


def build_differences(train: Manifest, other: Manifest) -> list[str]:
    """What makes ``other``'s rows encoded unlike ``train``'s: ``"processor (a vs b)"``, template, cutoff_len."""
    pairs = {
        "processor": (train.processor.digest[:12], other.processor.digest[:12]),
        "template": (train.options.template, other.options.template),
        "cutoff_len": (train.options.cutoff_len, other.options.cutoff_len),
    }
    return [f"{name} ({a} vs {b})" for name, (a, b) in pairs.items() if a != b]


def setup_data(
    cfg: TrainConfig, world_size: int, rows: list[int] | None = None
) -> tuple[ShardDataset | PackedDataset, Plan]:
    """The training shards (checked against the model's config; only ``rows`` of them when given, the
    training side of :func:`setup_eval`) and the step plan for ``world_size`` ranks. With --packing, the
    packs of those rows (:class:`qvl_train.packing.PackedDataset`), and the plan counts packed sequences."""
    dataset: ShardDataset | PackedDataset = ShardDataset(
        cfg.data, cfg.max_rows, rows=rows, verify_images=cfg.verify_images
    )
    check_compatible(model_config(cfg.model), dataset.processor, cfg.model, dataset.manifest.family)
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
    if cfg.model in TINY_MODELS:
        if dist.local_rank == 0:
            tiny_model_dir(cfg.model)
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


def setup_eval_loader(
    cfg: TrainConfig, eval_set: ShardDataset | None, dist: Dist, dtype: torch.dtype
) -> tuple[torch.utils.data.DataLoader | None, Callable[[dict[str, Any]], dict[str, Any]] | None]:
    """The evaluation set's loader and input builder (an --eval-data build's own processor), or Nones. Its own
    loader and generator: evaluating never moves the training stream."""
    if eval_set is None:
        return None, None
    loader = make_eval_loader(eval_set, cfg.per_device_eval_batch_size, dist, cfg.dataloader_num_workers)
    return loader, input_builder(dist.device, dtype, eval_set.processor)


@dataclass
class Run:
    """What the steps of one run share: its options, ranks, plan and output directory, the model (the PEFT
    model, not DDP's wrapper: evaluation and saving use it), optimizer and schedule, and the evaluation set's
    loader and inputs (None without one)."""

    cfg: TrainConfig
    dist: Dist
    plan: Plan
    out: Path
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Callable[[], Any]
    eval_loader: torch.utils.data.DataLoader | None
    eval_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None
    eval_identity: dict[str, Any] = field(default_factory=dict)  # recorded in each checkpoint ...
    fingerprint: str = ""  # ... with the --data build's fingerprint
    console: Any = None  # the progress bar's console while the loop runs
    trackers: Trackers = field(default_factory=lambda: Trackers([], []))  # --report-to (rank 0)

    def log(self, record: dict[str, Any], line: Callable[[dict[str, Any]], str]) -> None:
        """Append ``record`` to trainer_log.jsonl, print its console line and send it to the trackers
        (rank 0)."""
        if self.dist.main:
            append_jsonl(self.out / LOG_FILE, [record])
            self.console.print(line(record), soft_wrap=True)
            self.trackers.log(record)


# ------------------------------------------------------------------------------------------------ run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) the training; returns a summary. QvlError for user errors, and
    for Ctrl-C and failed writes into output_dir (one line saying how to continue)."""
    dist = setup_distributed(cfg)
    try:
        with ExitStack() as hold:  # the output directory's lock, released however the run ends
            return _train(cfg, dist, hold)
    except KeyboardInterrupt:
        raise QvlError(f"interrupted; {how_to_continue(cfg)}") from None
    except OSError as e:
        out = Path(cfg.output_dir).resolve()
        if not e.filename or out not in Path(e.filename).resolve().parents:
            raise
        raise QvlError(f"{e.filename}: cannot write ({e.strerror or e}); {how_to_continue(cfg)}") from None
    finally:
        teardown_distributed()


def how_to_continue(cfg: TrainConfig) -> str:
    """What a stopped run's user can do next: resume from its last complete checkpoint, if it has one."""
    saved = checkpoints(Path(cfg.output_dir))
    if saved:
        return f"the same command with --resume auto continues from {saved[-1]}"
    return "no checkpoint was saved yet: the same command with --overwrite-output-dir true starts afresh"


def _train(cfg: TrainConfig, dist: Dist, hold: ExitStack) -> dict[str, Any]:
    from rich.console import Console

    console = Console(highlight=False, quiet=not dist.main)
    world_size = planned_world_size(cfg, dist)
    train_rows, eval_set = setup_eval(cfg, console)
    dataset, plan = setup_data(cfg, world_size, train_rows)
    eval_rows = len(eval_set) if eval_set is not None else 0
    if cfg.dry_run:
        return dry_run(cfg, plan, eval_rows, console)

    # ---- output dir (a refused resume raises here, before any write), model, optimizer, resume
    out = Path(cfg.output_dir)
    eval_identity = eval_set_identity(eval_set, cfg.val_size, cfg.eval_data)
    fingerprint = dataset.manifest.fingerprint
    resume = prepare_output_dir(cfg, plan, dist, eval_identity, fingerprint, hold)
    model, dtype = setup_model(cfg, dist)
    params = param_report(model)
    console.print(plan_table(plan, params, cfg, eval_rows))
    trainable, optimizer, scheduler = make_optimizer(model, cfg, plan.warmup_steps, plan.total_steps)
    autocast = autocast_for(dist.device, dtype)
    eval_loader, eval_inputs = setup_eval_loader(cfg, eval_set, dist, dtype)
    run = Run(cfg, dist, plan, out, model, optimizer, scheduler, autocast, eval_loader, eval_inputs)
    run.eval_identity, run.fingerprint = eval_identity, fingerprint
    state = resume_from(run, resume, console) if resume is not None else None
    summary = {**dry_run_summary(plan, params, eval_rows), "config": to_dict(cfg)}
    if dist.main:  # after the resume loaded: a refused resume leaves the old plan.json in place
        write_json(out / PLAN_FILE, summary)
    run.trackers = open_trackers(
        parse_report_to(cfg.report_to), out, out.name, summary, state.step if state else None, dist.main
    )
    hold.callback(run.trackers.close)

    # ---- the loop
    sampler, loader = setup_loader(cfg, dataset, dist)
    to_inputs = input_builder(dist.device, dtype, dataset.processor)
    ddp = wrap_ddp(model, dist) if dist.world_size > 1 else model
    meter = Meter(plan, state.step, state.elapsed_s, state.pending) if state else Meter(plan)
    step = state.step if state else 0
    stop = min(plan.total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else plan.total_steps
    last_eval: dict[str, Any] = {}
    model.train()
    with training_progress(console, dist.main) as progress:
        run.console = progress.console
        task = progress.add_task("steps", total=plan.total_steps, completed=step)
        for epoch, window in step_windows(plan, sampler, loader, step, stop):
            if cfg.log_samples:
                log_samples(run, window, step + 1, epoch)
            lr = scheduler.get_last_lr()[0]
            loss, tokens, rows = run_window(ddp, window, dist, to_inputs, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
            check_finite(run, step + 1, loss, grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(task, advance=1, eta=meter.eta(step))
            meter.add(loss, tokens, rows)
            if step % cfg.logging_steps == 0 or step == plan.total_steps:
                run.log(meter.record(step, lr, float(grad_norm)), train_line)
            last_eval = maybe_evaluate(run, step, meter) or last_eval
            maybe_save(run, step, stop, meter)

    finished = finish(run, step, meter, console)
    summary = {"step": step, "finished": finished, "last_log": meter.last, "last_eval": last_eval}
    return {"plan": plan.to_dict(), "params": params, **summary}


def planned_world_size(cfg: TrainConfig, dist: Dist) -> int:
    """The ranks the plan is for: torchrun's, or with --dry-run the --world-size asked for."""
    if cfg.dry_run:
        return cfg.world_size or dist.world_size
    if cfg.world_size and cfg.world_size != dist.world_size:
        raise QvlError(
            f"world_size {cfg.world_size} requested but torchrun started {dist.world_size} process(es)"
        )
    return dist.world_size


def dry_run_summary(plan: Plan, params: dict[str, Any], eval_rows: int) -> dict[str, Any]:
    return {"plan": plan.to_dict(), "params": params, "eval_rows": eval_rows}


def dry_run(cfg: TrainConfig, plan: Plan, eval_rows: int, console: Any) -> dict[str, Any]:
    """--dry-run: the plan table of the model built on the meta device (no weights), and its summary."""
    params = param_report(meta_model(cfg, model_config(cfg.model)))
    console.print(plan_table(plan, params, cfg, eval_rows))
    return dry_run_summary(plan, params, eval_rows)


def step_windows(
    plan: Plan, sampler: RankBatchSampler, loader: torch.utils.data.DataLoader, step: int, stop: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(epoch, micro-batches)`` of each optimizer step from ``step`` to ``stop``: the sampler restarts at
    each epoch, and on a resume at the checkpoint's position within its epoch."""
    iterator, iterator_epoch = None, None
    for current in range(step, stop):
        epoch, first, count = plan.micro_batches(current)
        if iterator_epoch != epoch:
            sampler.set_epoch(epoch, first)
            iterator, iterator_epoch = iter(loader), epoch
        yield epoch, [next(iterator) for _ in range(count)]


def resume_from(run: Run, checkpoint: Path, console: Any) -> TrainState:
    """Load ``checkpoint`` (which :func:`qvl_train.checkpoint.check_resume` accepted) into the run, drop what
    was logged after it, and say where the run continues."""
    state = load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.dist)
    if run.dist.main:
        truncate_jsonl(run.out / LOG_FILE, state.step)
        console.print(
            f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})"
        )
    if run.cfg.log_samples:
        truncate_jsonl(run.out / f"samples-rank{run.dist.rank}.jsonl", state.step)
    return state


def check_finite(run: Run, step: int, loss: float, grad_norm: torch.Tensor) -> None:
    """Stop at the first step whose loss or gradient norm is not finite, before the optimizer applies it:
    nothing NaN is logged or saved, and the checkpoints saved before stay the last good ones. The same on
    every rank (the loss is summed over ranks, the gradients are synchronised)."""
    norm = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(norm):
        return
    saved = checkpoints(run.out)
    kept = f"{saved[-1]} is the last good checkpoint" if saved else "no checkpoint was saved before it"
    raise QvlError(
        f"step {step}: the loss is {loss:g} and the gradient norm {norm:g} (not finite); stopped before "
        f"applying it, {kept}; lower --learning-rate (now {run.cfg.learning_rate:g}) or check --max-grad-norm"
    )


def maybe_evaluate(run: Run, step: int, meter: Meter) -> dict[str, Any] | None:
    """Evaluate every eval_steps steps and at the end, and log the record (returned; None when not due).
    It runs before the checkpoint, so a resume from checkpoint-N never redoes (or re-logs) step N's
    evaluation; its time is left out of the training throughput."""
    cfg, at_end = run.cfg, step == run.plan.total_steps
    if run.eval_loader is None or not (at_end or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0)):
        return None
    started = time.perf_counter()
    # the model, not DDP's wrapper: a forward outside DDP leaves its reducer state alone
    result = evaluate(run.model, run.eval_loader, run.dist, run.eval_inputs, run.autocast)
    seconds = time.perf_counter() - started
    record = {**position(run.plan, step), **result, "eval_s": round(seconds, 3)}
    run.log(record, eval_line)
    meter.exclude(seconds)
    return record


def maybe_save(run: Run, step: int, stop: int, meter: Meter) -> Path | None:
    """Save checkpoint-N every save_steps steps, at the end and at --stop-at-step (with the log window open
    at that step, so a resumed run logs the same records); its time is left out of the throughput."""
    cfg, plan = run.cfg, run.plan
    if not ((cfg.save_steps > 0 and step % cfg.save_steps == 0) or step in (plan.total_steps, stop)):
        return None
    epoch, first, _ = plan.micro_batches(step)  # where the next step starts
    state = TrainState(
        step=step,
        epoch=epoch,
        batches_done=first,
        world_size=run.dist.world_size,
        seed=cfg.seed,
        plan=plan,
        elapsed_s=meter.elapsed(),
        pending=meter.pending(),
        eval_set=run.eval_identity,
        config=to_dict(cfg),
        data_fingerprint=run.fingerprint,
    )
    started = time.perf_counter()
    path = save_checkpoint(
        run.out, step, run.model, run.optimizer, run.scheduler, state, run.dist, cfg.save_total_limit
    )
    if run.dist.main and cfg.plot_loss:
        plot_loss(run.out)
    meter.exclude(time.perf_counter() - started)
    return path


def finish(run: Run, step: int, meter: Meter, console: Any) -> bool:
    """A finished run saves the adapter (and the plot) in output_dir; a stopped one leaves its checkpoint.
    Returns whether the run finished."""
    finished = step >= run.plan.total_steps
    if finished and run.dist.main:
        run.model.save_pretrained(run.out, safe_serialization=True)
        if run.cfg.plot_loss:
            plot_loss(run.out)
    run.dist.barrier()
    console.print(
        f"{'done' if finished else 'stopped'} at step {step}/{run.plan.total_steps} in {hms(meter.elapsed())}; "
        f"{'adapter' if finished else 'checkpoint'} in {run.out}"
    )
    return finished


def log_samples(run: Run, window: list[dict[str, Any]], step: int, epoch: int) -> None:
    """--log-samples: append which rows this rank trains on at ``step`` to samples-rank<rank>.jsonl."""
    rank = run.dist.rank
    records = [
        {"step": step, "epoch": epoch, "rank": rank, "row": row, "source": source, "index": index}
        for batch in window
        for row, source, index in batch["rows"]
    ]
    append_jsonl(run.out / f"samples-rank{rank}.jsonl", records)
