"""qvl-train when something around the rows goes wrong: a diverging loss, a resume onto other data, an
evaluation build made differently, two runs in one output directory, a damaged checkpoint, an output
directory that is a file, read-only or full, and Ctrl-C. Each ends in one line (exit 2) that says what
to do, and the checkpoints saved before stay intact.

The runs train the tiny model on the first rows of the demo build on CPU (seconds per run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from qvl_data.files import append_jsonl
from qvl_data.lock import exclusive_lock
from qvl_train.__main__ import main
from qvl_train.checkpoint import checkpoint_damage, checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--data", str(data), "--max-rows", "6", "--output-dir", str(out),
        "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--save-steps", "1",
        "--dataloader-num-workers", "0", "--plot-loss", "false", *extra,
    ]  # fmt: skip


def _fails(argv: list[str], capsys) -> str:
    """The one ``error:`` line of a run that exits 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def _json_lines(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path}: bare {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def other_build(tmp_path_factory, demo_dir) -> Path:
    """mllm_demo alone with --cutoff-len 1024: the same 6 rows as the demo build's first 6, another build."""
    from qvl_data.cli import main as data_main

    out = tmp_path_factory.mktemp("other") / "build"
    result = CliRunner().invoke(
        data_main, ["build", "--dataset", "mllm_demo", "--cutoff-len", "1024", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return out


@contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (skip where this process cannot mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------------------- silently wrong


def test_a_non_finite_gradient_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    demo_build, tmp_path, capsys
):
    out = tmp_path / "run"
    err = _fails(
        _args(demo_build, out, "--max-steps", "4", "--learning-rate", "1e6", "--warmup-ratio", "0"), capsys
    )
    # lr 1e6 after one step: step 2's gradient norm is NaN
    assert err.startswith("error: step 2: ") and "not finite" in err
    assert f"{out / 'checkpoint-1'} is the last good checkpoint" in err
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint_damage(out / "checkpoint-1", 1) is None
    assert not (out / "adapter_model.safetensors").exists()  # no adapter full of NaN
    assert [r["step"] for r in _json_lines(out / "trainer_log.jsonl")] == [1]


def test_the_training_log_writes_non_finite_numbers_as_null(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    append_jsonl(log, [{"step": 1, "eval_loss": float("nan"), "eval_accuracy": float("inf"), "eval_rows": 0}])
    assert _json_lines(log) == [{"step": 1, "eval_loss": None, "eval_accuracy": None, "eval_rows": 0}]


def test_resume_refuses_another_build_with_as_many_rows(demo_build, other_build, tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(demo_build, out, "--max-steps", "2", "--stop-at-step", "1"))
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["data_fingerprint"] == json.loads((demo_build / "manifest.json").read_text())["fingerprint"]
    err = _fails(_args(other_build, out, "--max-steps", "2", "--resume", "auto"), capsys)
    assert "checkpoint-1: trained on the build with fingerprint" in err and "not the same run" in err

    # a checkpoint from before the fingerprint was recorded: the counts decide, as they did
    del state["data_fingerprint"]
    (out / "checkpoint-1" / "trainer_state.json").write_text(json.dumps(state))
    main(_args(other_build, out, "--max-steps", "2", "--resume", "auto"))
    assert (out / "adapter_model.safetensors").is_file()


def test_an_eval_build_with_another_cutoff_is_named_in_a_warning(demo_build, other_build, capsys):
    main(["--model", "tiny", "--data", str(demo_build), "--eval-data", str(other_build), "--dry-run"])
    printed = capsys.readouterr().out
    assert f"warning: --eval-data {other_build} was built with another cutoff_len (2048 vs 1024)" in printed
    main(["--model", "tiny", "--data", str(demo_build), "--eval-data", str(demo_build), "--dry-run"])
    assert "warning" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- the output directory


def test_a_second_run_into_a_locked_output_dir_says_who_holds_it(demo_build, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # another run's lock (a second descriptor conflicts, as another process's would)
    with exclusive_lock(out / ".qvl-train.lock", out, "qvl-train run"):
        err = _fails(_args(demo_build, out, "--max-steps", "1"), capsys)
    assert f"another qvl-train run is writing here (pid {os.getpid()} on " in err
    assert "pass another --output-dir" in err
    assert sorted(p.name for p in out.iterdir()) == [".qvl-train.lock"]  # nothing else written
    main(_args(demo_build, out, "--max-steps", "1"))  # released: the lock file alone is an empty directory
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("damaged", ["optimizer.pt", "adapter_model.safetensors"])
def test_resume_auto_passes_over_a_damaged_latest_checkpoint(demo_build, tmp_path, capsys, damaged):
    out = tmp_path / "run"
    main(_args(demo_build, out, "--max-steps", "3", "--stop-at-step", "2"))
    path = out / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    capsys.readouterr()
    main(_args(demo_build, out, "--max-steps", "3", "--resume", "auto"))
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"checkpoint-2: damaged ({damaged} does not load" in warning[0]
    assert "resuming from checkpoint-1" in warning[0]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in captured.out.replace("\n", "")
    assert (out / "adapter_model.safetensors").is_file()


def test_an_output_dir_that_is_a_file_is_one_line(demo_build, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    err = _fails(_args(demo_build, out, "--max-steps", "1"), capsys)
    assert (
        err == f"error: {out}: --output-dir is a file, not a directory; pass a directory (created if missing)"
    )
    assert out.read_text() == "mine"


def test_a_read_only_output_dir_is_one_line(demo_build, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as out:
        err = _fails(_args(demo_build, out, "--max-steps", "1"), capsys)
    assert f"{out / '.qvl-train.lock'}: cannot prepare the output directory" in err
    assert "Read-only file system" in err


def test_a_full_disk_during_a_checkpoint_keeps_the_one_before(demo_build, tmp_path, capsys):
    # one checkpoint of the tiny model is ~450 kB: the first fits in 700 kB, the second does not
    with _tmpfs(tmp_path / "small", "size=700k") as out:
        err = _fails(_args(demo_build, out, "--max-steps", "3", "--save-total-limit", "0"), capsys)
        assert "cannot write the checkpoint" in err and "--resume auto" in err
        assert err.startswith(f"error: {out / 'checkpoint-2.tmp'}")
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
        assert checkpoint_damage(out / "checkpoint-1", 1) is None


def test_ctrl_c_says_the_same_command_with_resume_auto_continues(demo_build, tmp_path, capsys, monkeypatch):
    import qvl_train.loop

    real, calls = qvl_train.loop.run_window, []

    def interrupted_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(qvl_train.loop, "run_window", interrupted_at_step_3)
    err = _fails(_args(demo_build, out, "--max-steps", "4"), capsys)
    assert (
        err
        == f"error: interrupted; the same command with --resume auto continues from {out / 'checkpoint-2'}"
    )
    monkeypatch.setattr(qvl_train.loop, "run_window", real)
    main(_args(demo_build, out, "--max-steps", "4", "--resume", "auto"))
    assert [r["step"] for r in _json_lines(out / "trainer_log.jsonl")] == [1, 2, 3, 4]
