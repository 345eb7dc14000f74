"""What a training run shows: step lines within 80 columns, one ETA for lines and bar, a readable loss axis,
and the same records in the experiment trackers."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from qvl_train.config import TrainConfig
from qvl_train.loop import train
from qvl_train.meter import Meter
from qvl_train.plan import make_plan
from qvl_train.report import eval_line, loss_figure, train_line, training_progress

BIG_RECORD = {
    "step": 99_999,
    "total_steps": 99_999,
    "epoch": 2.9999,
    "loss": 11.96171234,
    "lr": 9.99e-05,
    "grad_norm": 123.4567,
    "trained_tokens": 10**6,
    "tokens_per_s": 1_234_567.8,
    "samples_per_s": 4321.1,
    "elapsed_s": 359_999.0,
    "eta_s": 359_999.0,
}


def test_step_and_eval_lines_fit_80_columns():
    line = train_line(BIG_RECORD)
    assert len(line) <= 80, line
    assert line == "step 99999/99999 loss 11.9617 lr 9.99e-05 grad 123 1,234,568 tok/s eta 99:59:59"
    record = {
        **BIG_RECORD,
        "eval_loss": 11.9,
        "eval_accuracy": 0.0123,
        "eval_rows": 123_456,
        "eval_s": 1234.5,
    }
    assert len(eval_line(record)) <= 80, eval_line(record)


def test_the_bar_shows_the_step_lines_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("qvl_train.meter.time.perf_counter", lambda: clock[0])
    plan = make_plan(100, 1, 1, 1, 1.0, 0, 0.0, 0)
    meter = Meter(plan, step=40)  # resumed at step 40: the pace counts from the resume, not from step 0
    for _ in range(10):  # 10 steps in 20 s
        clock[0] += 2.0
        meter.add(11.0, 100, 1)
    assert meter.eta(50) == 100.0  # 50 steps left at 2 s each
    out = io.StringIO()
    with training_progress(Console(file=out, force_terminal=True, width=100), True) as progress:
        task = progress.add_task("steps", total=100, completed=50, eta=meter.eta(50))
        progress.refresh()
    assert "eta 0:01:40" in out.getvalue()
    assert meter.record(50, 1e-4, 1.0)["eta_s"] == 100.0
    del task


def test_the_loss_axis_has_no_offset_notation():
    records = [{"step": s, "loss": 11.96 + 0.001 * s} for s in range(1, 6)]
    figure = loss_figure(records, "t")
    figure.canvas.draw()
    axis = figure.axes[0].yaxis
    assert axis.get_major_formatter().get_offset() == ""
    assert all(tick.get_text().startswith("11.9") for tick in axis.get_ticklabels() if tick.get_text())


def test_report_to_tensorboard_gets_the_logged_losses(demo_build: Path, tmp_path: Path, one_torch_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(demo_build),
        output_dir=str(out),
        max_steps=2,
        logging_steps=1,
        gradient_accumulation_steps=1,
        max_rows=8,
        save_steps=0,
        plot_loss=False,
        report_to="tensorboard",
    )
    train(cfg)
    logged = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [
        (step, round(loss, 5)) for step, loss in enumerate(logged, 1)
    ]
    assert "config/text_summary" in events.Tags()["tensors"]  # the plan and config, once, as text
