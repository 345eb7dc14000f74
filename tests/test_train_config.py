"""qvl_train.config: one dataclass, YAML + command-line overrides, one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qvl_data.errors import QvlError
from qvl_train.config import TrainConfig, field_docs, help_text, parse_config

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "qwen2_5vl_lora_sft.yaml"


def test_recipe_is_the_seed_recipe():
    cfg = parse_config(["--config", str(RECIPE)])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert cfg.lora_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1, 8)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert (cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.num_train_epochs) == ("cosine", 0.1, 3.0)
    assert cfg.bf16 and cfg.gradient_checkpointing and cfg.attn_implementation == "sdpa"
    assert (cfg.logging_steps, cfg.save_steps, cfg.plot_loss) == (10, 500, True)
    assert cfg.output_dir == "saves/qwen2_5vl-7b/lora/sft" and not cfg.overwrite_output_dir
    assert "overwrite_output_dir:" not in RECIPE.read_text()  # deleting checkpoints is never a recipe default
    assert cfg.model == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_command_line_overrides_yaml():
    cfg = parse_config(
        [
            "--config",
            str(RECIPE),
            "--model",
            "tiny",
            "--max-steps",
            "20",
            "--learning_rate",
            "3e-4",
            "--dry-run",
        ]
    )
    assert (cfg.model, cfg.max_steps, cfg.learning_rate, cfg.dry_run) == ("tiny", 20, 3e-4, True)
    cfg = parse_config(["--config", str(RECIPE), "--bf16", "false", "--overwrite-output-dir", "no"])
    assert cfg.bf16 is False and cfg.overwrite_output_dir is False
    assert parse_config([]) == TrainConfig()


def test_every_field_has_a_flag_and_a_docstring():
    docs = field_docs()
    text = help_text()
    for f in dataclasses.fields(TrainConfig):
        assert docs.get(f.name), f"{f.name} is undocumented"
        assert f"--{f.name.replace('_', '-')}" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora-rank", "0"], "lora_rank must be >= 1"),
        (["--lr-scheduler-type", "poly"], "lr_scheduler_type"),
        (["--lora-target", "q_proj,qkv"], "qkv"),
        (["--max-steps", "x"], "'x' is not a valid integer"),
        (["--no-such-option", "1"], "no such option --no-such-option"),
        (["--device", "tpu"], "device must be"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(QvlError, match=message):
        parse_config(argv)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nlearning_rate: 1.0e-4\n")
    with pytest.raises(QvlError, match="unknown option.*stage"):
        parse_config(["--config", str(bad)])
    bad.write_text("learning_rate: fast\n")
    with pytest.raises(QvlError, match="learning_rate: expected float"):
        parse_config(["--config", str(bad)])


def test_overwrite_output_dir_is_a_command_line_choice_only(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: tiny\noverwrite_output_dir: true\n")
    with pytest.raises(QvlError, match="overwrite_output_dir deletes the earlier run's checkpoints") as info:
        parse_config(["--config", str(recipe)])
    assert "\n" not in str(info.value)
    assert parse_config(["--config", str(recipe), "--overwrite-output-dir"]).overwrite_output_dir
    assert not parse_config(["--config", str(recipe), "--overwrite-output-dir", "false"]).overwrite_output_dir
    recipe.write_text("model: tiny\noverwrite_output_dir: false\n")
    assert not parse_config(["--config", str(recipe)]).overwrite_output_dir
    assert parse_config(["--overwrite-output-dir"]).overwrite_output_dir


def test_default_loader_path_is_the_measured_faster_one_and_help_says_why():
    # bench/loader.py: uint8 shards 146 batches/s with 0 workers, 96 with 2 (the per-batch hand-off from a
    # worker costs more than reading a qvl row); the default is the faster path and --help explains it
    assert TrainConfig().dataloader_num_workers == 0
    text = " ".join(help_text().split())
    assert "0 (the default) loads in the training process, which is the faster path" in text
    assert parse_config(["--config", str(RECIPE)]).dataloader_num_workers == 0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lerning-rate", "1e-4"], "no such option --lerning-rate; did you mean --learning-rate?"),
        # a prefix is not taken for the option it starts (argparse took --max-step as --max-steps)
        (["--max-step", "3"], "no such option --max-step; did you mean --max-steps?"),
        (["predict", "--max-row", "3"], "no such option --max-row; did you mean --max-rows?"),
        (["--dry-run", "maybe"], "'maybe' is not true or false"),
    ],
)
def test_mistyped_options_are_one_line_with_a_suggestion(argv, expected, capsys):
    from qvl_train.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "--help" in err


def test_unknown_yaml_key_is_named_with_a_suggestion_not_the_whole_list(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1.0e-4\n")
    with pytest.raises(QvlError) as info:
        parse_config(["--config", str(bad)])
    message = str(info.value)
    assert "unknown option 'lerning_rate' (did you mean learning_rate?)" in message
    assert "gradient_accumulation_steps" not in message and "\n" not in message


def test_help_fits_80_columns_with_the_common_options_first(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = help_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and len(lines) < 120, len(lines)
    common, more = text.index("Common options:"), text.index("More options:")
    for option in (
        "--config",
        "--model",
        "--data",
        "--output-dir",
        "--learning-rate",
        "--max-steps",
        "--dry-run",
    ):
        assert common < text.index(f"\n  {option} ") < more, option
    assert more < text.index("\n  --adam-beta1 ")
    assert "--max_steps" not in text  # the YAML spelling works but is not listed twice
    assert parse_config(["--max_steps", "4"]).max_steps == 4


def test_a_mistyped_command_is_named_with_a_suggestion(capsys):
    from qvl_train.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["predcit", "--max-rows", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such command 'predcit' (did you mean predict?)") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["predict", "score", "export"])
def test_every_command_help_fits_80_columns(command, monkeypatch, capsys):
    from qvl_train.__main__ import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"Usage: qvl-train {command} [OPTIONS]" in text and max(map(len, text.splitlines())) <= 80
