"""What a training run shows: its console lines, the plan table, the progress bar and the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qvl_train.checkpoint import LOG_FILE, PLOT_FILE
from qvl_train.config import TrainConfig
from qvl_train.plan import Plan

# ------------------------------------------------------------------------------------------------ logs


def plot_loss(out_dir: Path) -> Path | None:
    """training_loss.png: the logged loss (raw and exponentially smoothed) and eval loss against the step."""
    records = []
    if (out_dir / LOG_FILE).is_file():
        records = [
            json.loads(line) for line in (out_dir / LOG_FILE).read_text(encoding="utf-8").splitlines() if line
        ]
    figure = loss_figure(records, f"training loss of {out_dir}")
    if figure is None:
        return None
    path = out_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    return path


def loss_figure(records: list[dict[str, Any]], title: str) -> Any:
    """The matplotlib Figure of :func:`plot_loss` (None without a training record)."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.ticklabel_format(axis="y", useOffset=False)  # 11.96, not 0.01 with "+1.195e1" above the axis
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    return figure


def train_line(record: dict[str, Any]) -> str:
    """The console line of a training log record, within 80 columns for runs of up to 99,999 steps (epoch,
    samples/s and elapsed time are in trainer_log.jsonl and on the progress bar)."""
    return (
        f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
        f"grad {record['grad_norm']:.3g} {record['tokens_per_s']:,.0f} tok/s eta {hms(record['eta_s'])}"
    )


def eval_line(record: dict[str, Any]) -> str:
    """The console line of an evaluation log record (within 80 columns)."""
    return (
        f"eval step {record['step']}/{record['total_steps']} loss {record['eval_loss']:.4f} "
        f"accuracy {record['eval_accuracy']:.4f} ({record['eval_rows']:,} rows, {record['eval_s']:.1f} s)"
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


# ------------------------------------------------------------------------------------------- progress


def training_progress(console: Any, enabled: bool) -> Any:
    """The steps bar. Its ETA is the task field ``eta`` (seconds), which the loop sets from the same
    :meth:`qvl_train.meter.Meter.eta` as the step lines: rich's own estimate, from a short window of recent
    steps (and after a resume, from none), disagreed with them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class Eta(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[override]
            eta = task.fields.get("eta")
            return Text("eta -:--:--" if eta is None else f"eta {hms(eta)}", style="progress.remaining")

    from rich.text import Text

    return Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        Eta(),
        console=console,
        disable=not enabled,
    )


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
