"""--report-to: the training log's records reach TensorBoard, MLflow and W&B (offline), read back from their
own files; a resume continues the same tracker run."""

from __future__ import annotations

import json
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from qvl_data.errors import QvlError
from qvl_train.trackers import RUNS_FILE, TENSORBOARD_DIR, metrics_of, open_trackers, parse_report_to

RECORDS = [
    {
        "step": 1,
        "total_steps": 3,
        "epoch": 0.33,
        "loss": 11.9,
        "lr": 1e-4,
        "grad_norm": 2.5,
        "tokens_per_s": 900.0,
        "samples_per_s": 4.0,
        "trained_tokens": 120,
        "elapsed_s": 1.0,
        "eta_s": 2.0,
    },
    {
        "step": 2,
        "total_steps": 3,
        "epoch": 0.67,
        "loss": 11.5,
        "lr": 9e-5,
        "grad_norm": 2.0,
        "tokens_per_s": 950.0,
        "samples_per_s": 4.2,
        "trained_tokens": 118,
        "elapsed_s": 2.0,
        "eta_s": 1.0,
    },
    {
        "step": 2,
        "total_steps": 3,
        "epoch": 0.67,
        "eval_loss": 11.7,
        "eval_accuracy": 0.01,
        "eval_tokens": 50,
        "eval_rows": 2,
        "eval_s": 0.1,
    },
]
HPARAMS = {
    "plan": {"rows": 6, "total_steps": 3},
    "config": {"learning_rate": 1e-4, "lora_target": "q_proj,v_proj"},
}


def _log(names: list[str], out: Path, records: list[dict], resume_step: int | None = None) -> None:
    trackers = open_trackers(names, out, "run-a", HPARAMS, resume_step, main=True)
    for record in records:
        trackers.log(record)
    trackers.close()


def test_report_to_names_are_checked():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert parse_report_to("all") == ["tensorboard", "wandb", "mlflow", "trackio"]
    with pytest.raises(QvlError, match="report_to: unknown tracker\\(s\\) tensorbord; choose none or"):
        parse_report_to("tensorbord")


def test_train_and_eval_records_become_tracker_metrics():
    assert metrics_of(RECORDS[0]) == {
        "train/loss": 11.9,
        "train/lr": 1e-4,
        "train/grad_norm": 2.5,
        "train/tokens_per_s": 900.0,
        "train/samples_per_s": 4.0,
        "train/epoch": 0.33,
    }
    assert metrics_of(RECORDS[2]) == {"eval/loss": 11.7, "eval/accuracy": 0.01}


def test_only_the_main_rank_reports(tmp_path: Path):
    trackers = open_trackers(["tensorboard"], tmp_path, "run", HPARAMS, None, main=False)
    trackers.log(RECORDS[0])
    trackers.close()
    assert not any(tmp_path.iterdir())


def test_a_missing_tracker_package_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio now raises ImportError
    with pytest.raises(
        QvlError, match=r"--report-to trackio needs the trackio package: pip install -e '\.\[trackio\]'"
    ):
        open_trackers(["tensorboard", "trackio"], tmp_path, "run", HPARAMS, None, main=True)
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # checked before any tracker started


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_tensorboard_events_read_back_and_a_resume_hides_the_steps_it_redoes(tmp_path: Path):
    _log(["tensorboard"], tmp_path, RECORDS)
    log_dir = tmp_path / TENSORBOARD_DIR
    assert _scalars(log_dir, "train/loss") == [(1, 11.9), (2, 11.5)]
    assert _scalars(log_dir, "eval/accuracy") == [(2, 0.01)]
    # killed after step 2 but resumed from checkpoint-1: step 2 is trained (and logged) again, once
    _log(["tensorboard"], tmp_path, [dict(RECORDS[1], loss=11.4)], resume_step=1)
    assert _scalars(log_dir, "train/loss") == [(1, 11.9), (2, 11.4)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy on MLflow's store code
def test_mlflow_local_store_reads_back_and_a_resume_continues_the_run(tmp_path: Path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # a local store: MLflow 3 keeps runs in SQLite (its file store is refused unless MLFLOW_ALLOW_FILE_STORE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _log(["mlflow"], tmp_path / "out", RECORDS[:1])
    run_id = json.loads((tmp_path / "out" / RUNS_FILE).read_text())["mlflow"]
    _log(["mlflow"], tmp_path / "out", RECORDS[1:], resume_step=1)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.run_name == "run-a" and run.data.params["config.learning_rate"] == "0.0001"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 11.9), (2, 11.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss")] == [(2, 11.7)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB-log style 32 KiB blocks
    of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); wandb itself ships no reader."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores "train/loss" as the nested key train, loss


def test_wandb_offline_run_file_reads_back(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log(["wandb"], tmp_path, RECORDS)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's writer is a process of its own: on a loaded machine the file can still be growing when
    # finish() has returned, so read it until its history is there (or 20 s have passed)
    deadline = time.monotonic() + 20
    while True:
        try:
            records = list(_wandb_records(run_file))
        except Exception:  # a chunk still being written
            if time.monotonic() > deadline:
                raise
            records = []
        history = [
            {
                _key(item): json.loads(item.value_json)
                for item in r.history.item
                if not _key(item).startswith("_")
            }
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        if len(history) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert history == [metrics_of(RECORDS[0]), {**metrics_of(RECORDS[1]), **metrics_of(RECORDS[2])}]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "run-a" and run.project == "qvl"
    config = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["plan.rows"] == 6 and config["config.lora_target"] == "q_proj,v_proj"


def test_trackio_gets_the_same_calls(tmp_path: Path, monkeypatch):
    # trackio pins an older Pillow than qvl's, so it is not in [dev]: its API as documented (init/log/finish)
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(name=kw["name"]),
        log=lambda metrics, step=None: calls.append(("log", metrics, step)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "trackio", fake)
    _log(["trackio"], tmp_path, RECORDS[:1])
    assert calls[0][0] == "init" and calls[0][1]["project"] == "qvl" and calls[0][1]["resume"] == "never"
    assert calls[0][1]["config"]["plan.rows"] == 6
    assert calls[1] == ("log", metrics_of(RECORDS[0]), 1) and calls[2] == ("finish",)
    _log(["trackio"], tmp_path, RECORDS[1:2], resume_step=1)
    assert calls[3][1]["name"] == "run-a" and calls[3][1]["resume"] == "allow"
