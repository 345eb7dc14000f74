"""Whole-run problems in qvl-data's options: one line naming the option, exit 2, never a traceback
(a --model that is not a model, bad values, YAML files, validate --quiet)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset

from qvl_data.cli import main
from qvl_data.config import BuildConfig, load_config
from qvl_data.errors import QvlError
from qvl_data.processor import check_model_source, load_image_processor, load_tokenizer


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", "tiny", [{"messages": chat("hi", "hello")}])


def _one_line_error(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------- a --model that is not a model


@pytest.mark.parametrize("command", ["build", "validate"])
@pytest.mark.parametrize("kind", ["missing", "empty", "no_tokenizer", "file"])
def test_model_that_is_not_a_model_fails_in_one_line(tiny_dataset: Path, tmp_path: Path, command, kind):
    model = tmp_path / "model"
    if kind == "empty":
        model.mkdir()
    elif kind == "no_tokenizer":
        model.mkdir()
        (model / "preprocessor_config.json").write_text("{}")
    elif kind == "file":
        model.write_text("not a model")
    args = [command, "--dataset-dir", str(tiny_dataset), "--dataset", "tiny", "--model", str(model)]
    args += ["--quiet", "--num-proc", "1"] + (["--out", str(tmp_path / "out")] if command == "build" else [])
    line = _one_line_error(args, "--model", str(model))
    expected = {
        "missing": "does not exist",
        "empty": "is empty",
        "no_tokenizer": "tokenizer.json",
        "file": "file",
    }
    assert expected[kind] in line
    assert not (tmp_path / "out").exists()


def test_check_model_source_accepts_real_sources(tmp_path: Path):
    from qvl_data.processor import embedded_processor_dir

    check_model_source(None)
    check_model_source(str(embedded_processor_dir()))
    check_model_source("Qwen/Qwen2.5-VL-7B-Instruct")  # a hub id: only resolved when loading
    with pytest.raises(QvlError, match="does not exist"):
        check_model_source(str(tmp_path / "nope"))
    with pytest.raises(QvlError, match="does not exist"):
        check_model_source("./models/qwen")


def test_load_failures_are_one_line_qvl_errors(tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "preprocessor_config.json").write_text("{not json")
    for load in (load_tokenizer, load_image_processor):
        with pytest.raises(QvlError) as info:
            load(str(broken))
        assert "\n" not in str(info.value) and f"--model {broken}" in str(info.value)


# ---------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--cutoff-len", "0", "--cutoff-len must be >= 1, got 0"),
        ("--cutoff-len", "-5", "--cutoff-len must be >= 1"),
        ("--image-max-pixels", "100", "--image-max-pixels must be >= --image-min-pixels"),
        ("--image-max-pixels", "-1", "--image-max-pixels"),
        ("--image-min-pixels", "-5", "--image-min-pixels must be >= 0, got -5"),
        ("--num-proc", "-1", "--num-proc must be >= 0"),
        ("--shard-size-mb", "0", "--shard-size-mb must be >= 1"),
        ("--shard-size-mb", "-3", "--shard-size-mb must be >= 1"),
    ],
)
def test_bad_option_values_name_the_option(tiny_dataset: Path, tmp_path: Path, option, value, expected):
    args = ["build", "--dataset-dir", str(tiny_dataset), "--dataset", "tiny", "--out", str(tmp_path / "o")]
    _one_line_error(args + ["--quiet", option, value], expected)


def test_image_max_pixels_below_the_processor_minimum(tmp_path: Path):
    with pytest.raises(QvlError, match="--image-max-pixels must be >= 784"):
        BuildConfig(image_max_pixels=500, image_min_pixels=100)
    assert BuildConfig(image_max_pixels=784, image_min_pixels=0).image_max_pixels == 784


def test_set_var_value_with_a_control_token_is_refused():
    with pytest.raises(QvlError, match="--set-var name.*<\\|im_end\\|>"):
        BuildConfig(set_vars=["name=bot<|im_end|>"])


# ---------------------------------------------------------------------------------------- YAML files


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "build.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_dataset_list_and_documented_set_var_key(tmp_path: Path):
    config = load_config(
        BuildConfig, _yaml(tmp_path, "dataset: [a, b]\nset_var: [name=Qwen, author=Ali]\n"), {}
    )
    assert config.dataset == "a,b" and config.dataset_names == ["a", "b"]
    assert config.set_vars == ["name=Qwen", "author=Ali"]
    config = load_config(BuildConfig, _yaml(tmp_path, "set_var: {name: Qwen, author: Ali}\n"), {})
    assert config.set_vars == ["name=Qwen", "author=Ali"]
    config = load_config(BuildConfig, _yaml(tmp_path, "set_var: name=Qwen\n"), {})
    assert config.set_vars == ["name=Qwen"]
    # the field name keeps working; the command line still wins
    config = load_config(BuildConfig, _yaml(tmp_path, "set_vars: [name=A]\n"), {"set_vars": ["name=B"]})
    assert config.set_vars == ["name=B"]


def test_yaml_wrong_types_name_the_option(tmp_path: Path):
    with pytest.raises(QvlError, match="--cutoff-len must be a int, got 'long'"):
        load_config(BuildConfig, _yaml(tmp_path, "cutoff_len: long\n"), {})
    with pytest.raises(QvlError, match="--mask-history must be a bool"):
        load_config(BuildConfig, _yaml(tmp_path, "mask_history: 3\n"), {})


def test_yaml_config_builds_end_to_end(tiny_dataset: Path, tmp_path: Path):
    write_dataset(tiny_dataset, "other", [{"messages": chat("{{name}}?", "yes")}])
    yaml_path = _yaml(
        tmp_path,
        f"dataset_dir: {tiny_dataset}\ndataset: [tiny, other]\nset_var: {{name: Qwen}}\nnum_proc: 1\n",
    )
    result = CliRunner().invoke(main, ["validate", "--config", yaml_path, "--quiet"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------- validate --quiet


def test_validate_quiet_prints_only_rejections(tiny_dataset: Path):
    write_dataset(tiny_dataset, "bad", [{"messages": chat("hi", " ")}, {"messages": chat("a", "b")}])
    args = ["validate", "--dataset-dir", str(tiny_dataset), "--dataset", "tiny,bad", "--num-proc", "1"]
    quiet = CliRunner().invoke(main, args + ["--quiet"])
    assert quiet.exit_code == 1
    assert "rows" not in quiet.output and "total" not in quiet.output  # no table
    assert quiet.output.strip().splitlines() == [
        "empty_content bad.json row 0: field messages[1].content (assistant message) is empty"
    ]
    loud = CliRunner().invoke(main, args)
    assert "total" in loud.output and "empty_content" in loud.output
