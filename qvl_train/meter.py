"""The log window: what the optimizer steps since the last training record add up to, and that record.

A record's loss is the mean of its steps' losses; its throughput counts only training time: evaluation and
checkpointing are excluded (:meth:`Meter.exclude`). A checkpoint saves the open window
(:meth:`Meter.pending`), so a run resumed mid-interval logs the same record as one that never stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from qvl_train.plan import Plan


@dataclass
class Window:
    """Sums over the optimizer steps since the last training record (trainer_state.json's ``pending``)."""

    loss: float = 0.0  # sum of the steps' mean token losses
    steps: int = 0
    tokens: int = 0  # trained tokens on all ranks
    samples: int = 0  # dataset rows on all ranks
    seconds: float = 0.0  # training time before the last resume (the meter adds its own)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def position(plan: Plan, step: int) -> dict[str, Any]:
    """The fields every log record starts with: where in the run ``step`` is."""
    return {"step": step, "total_steps": plan.total_steps, "epoch": round(step / plan.steps_per_epoch, 4)}


class Meter:
    """Owns the open :class:`Window` from ``step`` on (resumed: the checkpoint's, with its elapsed time) and
    turns it into a training log record."""

    def __init__(self, plan: Plan, step: int = 0, elapsed_before: float = 0.0, window: Window | None = None):
        self.plan = plan
        self.start_step = step
        self.elapsed_before = elapsed_before
        self.window = window or Window()
        self.run_start = self.interval_start = time.perf_counter()
        self.last: dict[str, Any] = {}  # the latest record

    def add(self, loss: float, tokens: int, samples: int) -> None:
        """One optimizer step's mean loss, trained tokens and rows (all ranks)."""
        self.window.loss += loss
        self.window.steps += 1
        self.window.tokens += tokens
        self.window.samples += samples

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint) out of the throughput."""
        self.interval_start += seconds

    def elapsed(self) -> float:
        """Wall time of the run so far, the time before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.run_start

    def pending(self) -> Window:
        """The open window as a checkpoint saves it: its training time so far included."""
        seconds = self.window.seconds + time.perf_counter() - self.interval_start
        return Window(**{**self.window.to_dict(), "seconds": seconds})

    def eta(self, step: int, now: float | None = None) -> float:
        """Seconds left after ``step`` at this run's pace so far (since its start or resume): the log record's
        and the progress bar's estimate alike."""
        now = time.perf_counter() if now is None else now
        done = step - self.start_step
        return (now - self.run_start) / done * (self.plan.total_steps - step) if done > 0 else 0.0

    def record(self, step: int, lr: float, grad_norm: float) -> dict[str, Any]:
        """The training log record of the window ending at ``step``; opens the next window."""
        now = time.perf_counter()
        seconds = max(self.window.seconds + now - self.interval_start, 1e-9)
        window = self.window
        self.last = {
            **position(self.plan, step),
            "loss": window.loss / window.steps,
            "lr": lr,
            "grad_norm": grad_norm,
            "trained_tokens": window.tokens,
            "tokens_per_s": window.tokens / seconds,
            "samples_per_s": window.samples / seconds,
            "elapsed_s": round(self.elapsed_before + now - self.run_start, 3),
            "eta_s": round(self.eta(step, now), 3),
        }
        self.window, self.interval_start = Window(), now
        return self.last
