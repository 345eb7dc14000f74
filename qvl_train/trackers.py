"""Experiment trackers (``--report-to``): the training log's records, also sent to TensorBoard, W&B, MLflow or
trackio, from rank 0 only.

Each tracker is an optional package imported only when asked for (``pip install -e ".[tensorboard]"`` and so
on); a missing one is a one-line error before training starts. Their own settings are respected as their
users know them: ``WANDB_MODE=offline`` / ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI`` /
``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_PROJECT``. A resumed run continues the same tracker run: the ids are kept
in ``output_dir/trackers.json``, and TensorBoard hides the events past the resumed step.

What is sent: every record ``trainer_log.jsonl`` gets (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``train/samples_per_s``, ``train/epoch``; ``eval/loss``, ``eval/accuracy``), at its
optimizer step; and once, the plan and the full configuration as hyper-parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvl_data.errors import QvlError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
#: tracker -> (the package to import, the extra that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
RUNS_FILE = "trackers.json"  # in output_dir: each tracker's run id, so that a resume continues that run
TENSORBOARD_DIR = "tensorboard"  # in output_dir

#: log record key -> tracker metric name (records carry more keys: step, totals, timings)
TRAIN_METRICS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "samples_per_s": "train/samples_per_s",
    "epoch": "train/epoch",
}
EVAL_METRICS = {"eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


def parse_report_to(text: str) -> list[str]:
    """``"none"`` or a comma-separated list of :data:`TRACKERS` (``"all"`` = every one)."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return list(TRACKERS)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise QvlError(
            f"report_to: unknown tracker(s) {', '.join(unknown)}; choose none or {', '.join(TRACKERS)}"
        )
    return list(dict.fromkeys(names))


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The tracker metrics of one training or evaluation log record."""
    names = EVAL_METRICS if "eval_loss" in record else TRAIN_METRICS
    return {metric: float(record[key]) for key, metric in names.items() if key in record}


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"plan": {"rows": 6}}`` -> ``{"plan.rows": 6}``: hyper-parameters as one flat mapping of scalars."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    if isinstance(value, (list, tuple)):
        return {prefix: json.dumps(value)}
    return {prefix: value}


def _require(name: str) -> Any:
    package, extra = PACKAGES[name]
    try:
        return __import__(package)
    except ImportError:
        raise QvlError(
            f"--report-to {name} needs the {package} package: pip install -e '.[{extra}]' (or pip install {package})"
        ) from None


class Trackers:
    """The trackers of one run (empty off rank 0 or with ``--report-to none``): ``log`` a record, ``close``."""

    def __init__(
        self, senders: list[Callable[[dict[str, float], int], None]], closers: list[Callable[[], None]]
    ):
        self._senders, self._closers = senders, closers

    def log(self, record: dict[str, Any]) -> None:
        metrics = metrics_of(record)
        for send in self._senders:
            send(metrics, int(record["step"]))

    def close(self) -> None:
        for close in self._closers:
            close()
        self._senders, self._closers = [], []


def open_trackers(
    names: list[str],
    output_dir: Path,
    run_name: str,
    hparams: dict[str, Any],
    resume_step: int | None,
    main: bool,
) -> Trackers:
    """Start (or, with ``resume_step``, continue) each named tracker on the main rank; nothing elsewhere."""
    if not main or not names:
        return Trackers([], [])
    for name in names:  # every missing package is reported before any tracker starts
        _require(name)
    runs_path = output_dir / RUNS_FILE
    runs: dict[str, str] = {}
    if resume_step is not None and runs_path.is_file():
        runs = json.loads(runs_path.read_text(encoding="utf-8"))
    params = flatten("", hparams)
    senders, closers = [], []
    for name in names:
        send, close, run_id = OPENERS[name](output_dir, run_name, params, runs.get(name), resume_step)
        senders.append(send)
        closers.append(close)
        if run_id:
            runs[name] = run_id
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_path.with_name(RUNS_FILE + ".tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, runs_path)
    return Trackers(senders, closers)


def _tensorboard(output_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None, resume_step):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: the events a killed run wrote after the checkpoint it resumes from are hidden, not doubled
    writer = SummaryWriter(
        str(output_dir / TENSORBOARD_DIR), purge_step=None if resume_step is None else resume_step + 1
    )
    if resume_step is None:
        writer.add_text("config", "```json\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def send(metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    return send, writer.close, None


def _wandb(output_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None, resume_step):
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "qvl"),
        name=run_name,
        id=run_id,
        resume="allow" if run_id else None,
        dir=str(output_dir),
        config=params,
    )

    def send(metrics: dict[str, float], step: int) -> None:
        run.log(metrics, step=step)

    return send, run.finish, run.id


def _mlflow(output_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None, resume_step):
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_NAME") is None:
        mlflow.set_experiment("qvl")
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    if run_id is None:
        # MLflow caps a parameter value's length; a long config entry is cut, never refused
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})

    def send(metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    return send, mlflow.end_run, run.info.run_id


def _trackio(output_dir: Path, run_name: str, params: dict[str, Any], run_id: str | None, resume_step):
    import trackio

    run = trackio.init(
        project=os.environ.get("TRACKIO_PROJECT", "qvl"),
        name=run_id or run_name,
        config=params,
        resume="allow" if run_id else "never",
    )

    def send(metrics: dict[str, float], step: int) -> None:
        trackio.log(metrics, step=step)

    return send, trackio.finish, getattr(run, "name", None) or run_name


OPENERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}
