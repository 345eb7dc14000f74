"""The training loop, start to end in one file (nanoGPT style).

    setup (torchrun env -> DDP)  ->  shards + plan  ->  model + LoRA  ->  AdamW + warmup/cosine
    ->  for each optimizer step: take the step's micro-batches, count their trained tokens on all ranks,
        forward/backward each (gradient sync on the last only), clip, step, log, checkpoint
    ->  adapter + log + plot in output_dir

Loss normalisation: every micro-batch contributes ``sum of token cross-entropies * world / T`` where T is
the number of trained tokens in the whole accumulation window on all ranks, counted before the window. DDP
averages gradients over ranks, so the optimised quantity is exactly the mean token loss of the window,
whatever the padding, the batch size or how the window is split across micro-batches and ranks; that same
mean is what gets logged.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from qvl_data.errors import QvlError
from qvl_data.template import IGNORE_INDEX
from qvl_train.config import TrainConfig, to_dict
from qvl_train.data import Plan, RankBatchSampler, ShardDataset, collate, make_plan, to_device
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

LOG_FILE = "trainer_log.jsonl"
PLAN_FILE = "plan.json"
PLOT_FILE = "training_loss.png"
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


# ----------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank: for decisions that must not differ between ranks."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """Sum over ranks (a float64 scalar on the training device, so token counts stay exact)."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise QvlError(
            "--device cuda requested but CUDA is not available (torch.cuda.is_available() is False)"
        )
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Rank, world and device from torchrun's environment (a plain process is rank 0 of 1); NCCL on CUDA,
    gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if world > 1 and not cfg.dry_run and not torch_dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=cfg.ddp_timeout)}
        if (
            device.type == "cuda"
            and "device_id" in inspect.signature(torch_dist.init_process_group).parameters
        ):
            kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing in barrier())
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel over the trainable (LoRA) weights; buffers (rotary tables) are never synced.

    DDP's start-up broadcast from rank 0 covers only the trainable weights: every rank loaded the same frozen
    base weights from the same files, so broadcasting them (16.6 GB for the 7B model) would change nothing.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [name for name, _ in model.named_buffers()]
    )
    no_buffer_sync = {"broadcast_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}  # torch >= 2.12 spelling
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


# ------------------------------------------------------------------------------------------- schedule


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


# ----------------------------------------------------------------------------------------------- loss


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the trained tokens, in fp32.

    Logits are computed only at the positions whose next token is trained in some row of the batch
    (``logits_to_keep``): the 152k-wide vocabulary projection of the prompt tokens is never materialised.
    ``labels`` are the batch's labels on the CPU: the kept positions (a data-dependent ``nonzero``) are found
    there, so no micro-batch waits for the GPU to report them; only the index and the targets are copied over.
    """
    if labels.device.type != "cpu":
        raise ValueError("token_loss_sum takes the CPU labels (finding the kept positions on a GPU syncs)")
    device = inputs["input_ids"].device
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing trained here: still run forward/backward so DDP's ranks stay in step
        keep = torch.zeros(1, dtype=torch.long)
    kept_targets = targets[:, keep].reshape(-1)
    if device.type == "cuda":  # a copy from pageable memory would wait for the queued GPU work
        keep, kept_targets = keep.pin_memory(), kept_targets.pin_memory()
    kept_targets = kept_targets.to(device, non_blocking=True)
    logits = model(**inputs, logits_to_keep=keep.to(device, non_blocking=True), use_cache=False).logits
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),  # (batch * kept, vocab)
        kept_targets,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def run_window(
    model: torch.nn.Module,
    window: list[dict[str, Any]],
    dist: Dist,
    to_inputs: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], Any] = nullcontext,
) -> tuple[float, int]:
    """Forward + backward over one accumulation window (this rank's micro-batches); gradients are
    synchronised on the last micro-batch only. Returns (mean token loss over all ranks, trained tokens)."""
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
    return float(dist.sum(loss_sum).item()) / max(tokens, 1), tokens


# ----------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain lists (loadable with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np.array(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX) :].isdigit():
        return None
    return int(name[len(CHECKPOINT_PREFIX) :])


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete once renamed from its .tmp directory; the state file is written last."""
    return checkpoint_step(path) is not None and (path / STATE_FILE).is_file()


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    dist: Dist,
    save_total_limit: int,
) -> Path:
    """checkpoint-N/: adapter (safetensors), optimizer.pt, scheduler.pt, rng_state_<rank>.pt and
    trainer_state.json (step, data-loader position, pending log sums), written into checkpoint-N.tmp and
    renamed when complete. Everything loads with ``torch.load(weights_only=True)``."""
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out_dir / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    # every rank creates it too (a no-op on a shared output_dir): a rank that does not see rank 0's
    # directory writes its RNG state into its own rather than failing with FileNotFoundError
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_state_{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / STATE_FILE, state)  # last: marks the content complete
        for path in tmp.iterdir():
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit > 0:
            for old in checkpoints(out_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist
) -> dict:
    """Restore adapter, optimizer, scheduler and this rank's RNG; return the trainer state (which
    :func:`check_resume` has already found to belong to this run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_state(path)
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(dist.device))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise QvlError(f"{path}: adapter does not fit this model (unexpected keys such as {unexpected[0]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dist.device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_state_{dist.rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ----------------------------------------------------------------------------------------- output dir

_ARTEFACTS = (LOG_FILE, PLAN_FILE, PLOT_FILE, *ADAPTER_FILES)


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QvlError(f"{checkpoint / STATE_FILE}: cannot read the trainer state ({e})") from None


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def check_resume(checkpoint: Path, plan: Plan, cfg: TrainConfig, world_size: int) -> None:
    """QvlError unless ``checkpoint`` belongs to this run (same ranks, plan, seed and data position).
    Called before anything is written, so a refused resume leaves the output directory as it was."""
    state = read_state(checkpoint)
    try:
        if state["world_size"] != world_size:
            raise QvlError(
                f"{checkpoint}: saved by {_ranks(state['world_size'])}, resumed with {world_size}; the data "
                "split would differ (resume with the same number of processes)"
            )
        for key in ("rows", "total_steps", "steps_per_epoch", "grad_accum", "batch_size"):
            if state["plan"][key] != getattr(plan, key):
                raise QvlError(
                    f"{checkpoint}: {key} was {state['plan'][key]}, now {getattr(plan, key)}; not the same run"
                )
        if state["seed"] != cfg.seed:
            raise QvlError(f"{checkpoint}: seed was {state['seed']}, now {cfg.seed}; not the same run")
        epoch, first, _ = plan.micro_batches(state["step"])
        if (state["data"]["epoch"], state["data"]["batches_done"]) != (epoch, first):
            raise QvlError(
                f"{checkpoint}: data-loader state {state['data']} does not match step {state['step']}"
            )
    except KeyError as e:
        raise QvlError(f"{checkpoint / STATE_FILE}: no {e} (not a qvl-train checkpoint)") from None


def find_start(cfg: TrainConfig, plan: Plan, world_size: int) -> tuple[Path | None, bool]:
    """This process's view of where to start: ``(checkpoint to resume or None, clear the old run)``.
    Refuses to mix with an old run unless overwrite_output_dir, which deletes that run's files."""
    out = Path(cfg.output_dir)
    resume: Path | None = None
    if cfg.resume == "auto":
        found = checkpoints(out)
        resume = found[-1] if found else None
    elif cfg.resume:
        resume = Path(cfg.resume)
        if not is_complete_checkpoint(resume):
            raise QvlError(f"{resume}: not a complete checkpoint (expected checkpoint-N/ with {STATE_FILE})")
    if resume is not None:
        check_resume(resume, plan, cfg, world_size)
        return resume, False
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite_output_dir:
            if cfg.resume == "auto":
                problem, hint = "is not empty and holds no complete checkpoint", ""
            else:
                problem, hint = "is not empty", " or --resume auto to continue from its last checkpoint"
            raise QvlError(
                f"{out}: output directory {problem}; pass --overwrite-output-dir true to start afresh{hint}"
            )
        return None, True
    return None, False


def decide_start(cfg: TrainConfig, plan: Plan, dist: Dist) -> tuple[Path | None, bool]:
    """Rank 0 decides (:func:`find_start`) and every rank follows: ranks that each picked "the latest
    checkpoint" from their own view of the directory could resume at different steps and hang. A refusal
    is raised on every rank, with rank 0's message."""
    decision: dict[str, Any] = {"resume": None, "clear": False, "error": None}
    if dist.main:
        try:
            resume, clear = find_start(cfg, plan, dist.world_size)
            decision = {"resume": None if resume is None else str(resume), "clear": clear, "error": None}
        except QvlError as e:
            decision["error"] = str(e)
    decision = dist.broadcast_object(decision)
    if decision["error"]:
        raise QvlError(decision["error"])
    return (Path(decision["resume"]) if decision["resume"] else None), decision["clear"]


def check_shared_output_dir(out: Path, dist: Dist) -> None:
    """Every rank must see what rank 0 writes in output_dir (checkpoints hold every rank's RNG state and
    are read back by every rank on resume): rank 0 writes a file with a random token, each rank looks for
    it, and all ranks fail with one line if any does not see it."""
    if dist.world_size == 1:
        return
    token = dist.broadcast_object(secrets.token_hex(8) if dist.main else None)
    marker = out / f".qvl-shared-check-{token}"
    if dist.main:
        marker.write_text(token, encoding="utf-8")
    dist.barrier()
    try:
        seen = marker.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = int(dist.sum(0.0 if seen else 1.0).item())
    dist.barrier()  # everyone has looked before the file goes
    if dist.main:
        marker.unlink(missing_ok=True)
    if blind:
        raise QvlError(
            f"{out}: output_dir must be a directory that every rank sees (on multi-node runs a filesystem "
            f"shared by all nodes); {_ranks(blind)} of {dist.world_size} do not see the file rank 0 wrote there"
        )


def prepare_output_dir(cfg: TrainConfig, plan: Plan, dist: Dist) -> Path | None:
    """Decide where to start (:func:`decide_start`), clear an old run if asked, create output_dir and check
    that every rank sees it. Returns the checkpoint to resume from, or None. Nothing is written before
    the decision, so a refused start leaves the directory as it was."""
    out = Path(cfg.output_dir)
    resume, clear = decide_start(cfg, plan, dist)
    dist.barrier()  # every rank has decided before anything is deleted
    if dist.main:
        if clear:
            for path in out.iterdir():
                if path.name in _ARTEFACTS or path.name.startswith((CHECKPOINT_PREFIX, "samples-rank")):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    check_shared_output_dir(out, dist)
    return resume


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (by a run that went past its last checkpoint)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and json.loads(line)["step"] <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def plot_loss(out_dir: Path) -> Path | None:
    """training_loss.png: the logged loss (raw and exponentially smoothed) against the step."""
    records = []
    if (out_dir / LOG_FILE).is_file():
        records = [
            json.loads(line) for line in (out_dir / LOG_FILE).read_text(encoding="utf-8").splitlines() if line
        ]
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
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
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {out_dir}")
    ax.legend()
    figure.tight_layout()
    path = out_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------- plan


def plan_table(plan: Plan, params: dict[str, Any], cfg: TrainConfig):
    from rich.table import Table

    table = Table(title="qvl-train plan", show_header=False, title_justify="left")
    rows = [
        ("rows", f"{plan.rows:,}"),
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


# ------------------------------------------------------------------------------------------------ run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan) the training; returns a summary. QvlError for user errors."""
    dist = setup_distributed(cfg)
    try:
        return _train(cfg, dist)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist) -> dict[str, Any]:
    from rich.console import Console

    console = Console(highlight=False, quiet=not dist.main)
    dataset = ShardDataset(cfg.data, cfg.max_rows)
    config = model_config(cfg.model)
    check_compatible(config, dataset.processor, cfg.model)
    if cfg.world_size and not cfg.dry_run and cfg.world_size != dist.world_size:
        raise QvlError(
            f"world_size {cfg.world_size} requested but torchrun started {dist.world_size} process(es)"
        )
    plan = make_plan(
        len(dataset),
        cfg.world_size if cfg.dry_run and cfg.world_size else dist.world_size,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        cfg.num_train_epochs,
        cfg.max_steps,
        cfg.warmup_ratio,
        cfg.warmup_steps,
    )
    if cfg.dry_run:
        params = param_report(meta_model(cfg, config))
        console.print(plan_table(plan, params, cfg))
        return {"plan": plan.to_dict(), "params": params}

    # ---- output dir, seed, model
    out = Path(cfg.output_dir)
    resume = prepare_output_dir(cfg, plan, dist)  # a refused resume raises here, before any write
    if cfg.model == TINY:  # build the cached tiny model once per machine, before the other ranks read it
        if dist.local_rank == 0:
            tiny_model_dir()
        dist.barrier()
    seed_everything(cfg.seed)
    device, dtype = dist.device, model_dtype(cfg, dist.device)
    model = load_model(cfg, device, dtype)
    params = param_report(model)
    console.print(plan_table(plan, params, cfg))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    schedule = functools.partial(
        lr_factor, warmup=plan.warmup_steps, total=plan.total_steps, kind=cfg.lr_scheduler_type
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ---- resume
    step, elapsed_before = 0, 0.0
    pending = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "seconds": 0.0}
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, scheduler, dist)  # check_resume passed
        step, elapsed_before, pending = state["step"], state["elapsed_s"], state["pending"]
        epoch, first, _ = plan.micro_batches(step)
        if dist.main:
            _truncate_jsonl(out / LOG_FILE, step)
            console.print(f"resumed from {resume} at step {step} (epoch {epoch}, batch {first})")
        if cfg.log_samples:
            _truncate_jsonl(out / f"samples-rank{dist.rank}.jsonl", step)

    if dist.main:  # after the resume loaded: a refused resume leaves the old plan.json in place
        _write_json(out / PLAN_FILE, {"plan": plan.to_dict(), "params": params, "config": to_dict(cfg)})

    # ---- data
    sampler = RankBatchSampler(
        len(dataset), cfg.per_device_train_batch_size, dist.rank, dist.world_size, cfg.seed
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # never touch the global RNG (exact resume)
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    mm_types = "mm_token_type_ids" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters

    def to_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        inputs = to_device(batch, device, dtype, dataset.processor)
        if not mm_types:  # transformers releases that find image tokens themselves
            inputs.pop("mm_token_type_ids")
        return inputs

    def autocast():
        if device.type == "cuda" and dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    ddp = wrap_ddp(model, dist) if dist.world_size > 1 else model

    # ---- loop
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    stop = min(plan.total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else plan.total_steps
    start_step, run_start, interval_start = step, time.perf_counter(), time.perf_counter()
    last_record: dict[str, Any] = {}
    samples_file = out / f"samples-rank{dist.rank}.jsonl"
    model.train()
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not dist.main,
    )
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
                _append_jsonl(samples_file, _sample_records(window, step + 1, epoch, dist.rank))
            lr = scheduler.get_last_lr()[0]
            loss, tokens = run_window(ddp, window, dist, to_inputs, autocast)
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
            pending["samples"] += sum(len(b["rows"]) for b in window) * dist.world_size
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
                    _append_jsonl(out / LOG_FILE, [record])
                    progress.console.print(
                        f"step {step}/{plan.total_steps}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
                        f"lr {lr:.3e}  grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
                        f"{record['samples_per_s']:.2f} samples/s  elapsed {_hms(elapsed)}  eta {_hms(record['eta_s'])}",
                        soft_wrap=True,
                    )
                last_record = record
                pending = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "seconds": 0.0}
                interval_start = now

            at_end = step == plan.total_steps
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
