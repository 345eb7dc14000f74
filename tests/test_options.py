"""Each option declared once: BuildConfig's fields drive qvl-data's options, the YAML keys, the fingerprint
and the manifest's ``options``; both tools print usage mistakes in one line with a did-you-mean, refuse
prefixes, and keep --help within 80 columns with the common options first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset

from qvl_data import shards
from qvl_data.build import build, build_options, fingerprint, library_versions
from qvl_data.cli import main
from qvl_data.config import BuildConfig, load_config
from qvl_data.format import BuildOptions, Manifest
from qvl_data.options import OUTPUT_OPTION, ConfigOption, declared, flag, output_options, public_name
from qvl_data.sources import resolve_datasets


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", "tiny", [{"messages": chat("hi", "hello")}])


def _other_value(config: BuildConfig, f: dataclasses.Field, tmp_path: Path):
    """A valid value of ``f`` other than ``config``'s (fails loudly for a type this test does not know)."""
    value = getattr(config, f.name)
    if f.name == "template":  # None is the family's (qwen2_vl here): another template changes the bytes
        return "qwen3_vl"
    if declared(f, "choices"):
        return next(c for c in declared(f, "choices") if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, list):
        return [*value, "name=Qwen"]
    if f.name == "media_dir":
        return str(tmp_path)
    raise AssertionError(f"no other value known for {f.name} = {value!r}")


def _fingerprint(config: BuildConfig) -> str:
    dataset_dir = Path(config.dataset_dir)
    return fingerprint(resolve_datasets(dataset_dir, config.dataset_names), dataset_dir, config, {"x": "1"})


def test_every_output_option_changes_the_fingerprint_and_nothing_else_does(tiny: Path, tmp_path: Path):
    base = BuildConfig(dataset_dir=str(tiny), dataset="tiny")
    reference = _fingerprint(base)
    assert _fingerprint(BuildConfig(dataset_dir=str(tiny), dataset="tiny")) == reference
    for f in dataclasses.fields(BuildConfig):
        if declared(f, "output") == OUTPUT_OPTION:
            changed = dataclasses.replace(base, **{f.name: _other_value(base, f, tmp_path)})
            assert _fingerprint(changed) != reference, f"{f.name} is declared output but not hashed"
    for name, value in [("out", "elsewhere"), ("num_proc", 3), ("executor", "ray"), ("quiet", True)]:
        assert _fingerprint(dataclasses.replace(base, **{name: value})) == reference, name


def test_the_manifest_records_every_fingerprinted_option(tiny: Path, tmp_path: Path):
    assert [f.name for f in dataclasses.fields(BuildOptions)] != []
    # the family is not an option: it comes from --model (recorded because it decides the bytes too)
    recorded = {f.name for f in dataclasses.fields(BuildOptions)} - {"family"}
    assert recorded == set(output_options(BuildConfig))
    media = tmp_path / "media"
    media.mkdir()
    config = BuildConfig(
        dataset_dir=str(tiny),
        dataset="tiny",
        out=str(tmp_path / "out"),
        num_proc=1,
        quiet=True,
        shard_size_mb=7,
        media_dir=str(media),
        allow_outside_images=True,
        set_vars=["name=Qwen"],
    )
    manifest = build(config).manifest
    written = json.loads((tmp_path / "out" / shards.MANIFEST).read_text())["options"]
    assert written == dataclasses.asdict(build_options(config)) == dataclasses.asdict(manifest.options)
    for name in output_options(BuildConfig):
        expected = str(media.resolve()) if name == "media_dir" else getattr(config, name)
        if name == "template":  # the resolved template: the family's when not given
            expected = "qwen2_vl"
        assert written[name] == expected, name
    assert written["family"] == "qwen2_5_vl"
    assert manifest.fingerprint == _fingerprint_with(config, library_versions())


def _fingerprint_with(config: BuildConfig, versions: dict) -> str:
    dataset_dir = Path(config.dataset_dir).resolve()
    return fingerprint(resolve_datasets(dataset_dir, config.dataset_names), dataset_dir, config, versions)


def test_a_manifest_without_the_newer_options_still_loads(tiny: Path, tmp_path: Path):
    config = BuildConfig(
        dataset_dir=str(tiny), dataset="tiny", out=str(tmp_path / "o"), num_proc=1, quiet=True
    )
    data = build(config).manifest.to_dict()
    for name in ("shard_size_mb", "media_dir", "allow_outside_images"):
        del data["options"][name]
    old = Manifest.from_dict(json.loads(json.dumps(data)))
    assert old.options.cutoff_len == 2048 and old.options.shard_size_mb is None


def test_every_field_is_an_option_of_its_commands_and_a_yaml_key(tmp_path: Path):
    commands = {"read": ["convert", "validate", "build"], "encode": ["validate", "build"], "write": ["build"]}
    for command in ("convert", "validate", "build"):
        generated = {p.name: p for p in main.commands[command].params if isinstance(p, ConfigOption)}
        text = CliRunner().invoke(main, [command, "--help"]).output
        for f in dataclasses.fields(BuildConfig):
            assert declared(f, "stage") in commands, f"{f.name} declares no stage"
            assert (f.name in generated) == (command in commands[declared(f, "stage")]), (f.name, command)
            if f.name in generated:
                assert generated[f.name].opts == [flag(f)] and f"  {flag(f)} " in text, (f.name, command)
    # every option's public name is its YAML key
    yaml_path = tmp_path / "b.yaml"
    yaml_path.write_text("set_var: [name=Qwen]\ncutoff_len: 99\nallow_outside_images: true\n")
    config = load_config(BuildConfig, str(yaml_path), {})
    assert (config.set_vars, config.cutoff_len, config.allow_outside_images) == (["name=Qwen"], 99, True)
    assert public_name(next(f for f in dataclasses.fields(BuildConfig) if f.name == "set_vars")) == "set_var"


def test_unknown_yaml_key_names_it_and_suggests(tmp_path: Path):
    yaml_path = tmp_path / "b.yaml"
    yaml_path.write_text("cutof_len: 100\n")
    result = CliRunner().invoke(main, ["validate", "--config", str(yaml_path)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "unknown option 'cutof_len'" in line and "did you mean cutoff_len?" in line
    assert "image_max_pixels" not in line  # not the whole list of keys


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["build", "--cutof-len", "5"], "no such option --cutof-len; did you mean --cutoff-len?"),
        (["build", "--shard-size", "5"], "no such option --shard-size; did you mean --shard-size-mb?"),
        (["build", "--num-proc", "x"], "'x' is not a valid integer"),
    ],
)
def test_usage_mistakes_are_one_line_with_a_suggestion(args, expected):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert "--help" in lines[0]


def test_booleans_alone_or_with_a_value(tiny: Path):
    args = ["validate", "--dataset-dir", str(tiny), "--dataset", "tiny", "--num-proc", "1"]
    assert CliRunner().invoke(main, [*args, "--quiet"]).output == ""
    assert "total" in CliRunner().invoke(main, [*args, "--quiet", "false"]).output
    assert CliRunner().invoke(main, [*args, "--quiet", "yes", "--mask_history"]).output == ""


@pytest.mark.parametrize("command", [[], ["build"], ["validate"], ["convert"], ["inspect"], ["stats"]])
def test_help_fits_80_columns_with_the_common_options_first(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wider terminals still get at most 80 columns
    text = CliRunner().invoke(main, [*command, "--help"]).output
    assert max(map(len, text.splitlines())) <= 80, text
    if command == ["build"]:
        common, more = text.index("Common options:"), text.index("More options:")
        for option in ("--config", "--dataset-dir", "--dataset ", "--out", "--model", "--num-proc"):
            assert common < text.index(f"\n  {option}") < more, option
        assert more < text.index("\n  --pixel-format") and more < text.index("\n  --set-var")


def test_the_readme_table_lists_every_build_option_and_what_is_hashed():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| option | default | hashed | meaning |") :].split("\n\n", 1)[0]
    hashed = {}
    for row in table.splitlines()[2:]:
        names, _, mark = (cell.strip() for cell in row.strip("|").split("|")[:3])
        for name in names.replace("`", "").split(" / "):
            hashed[name.split()[0]] = mark
    expected = {"option": "value", "input": "content", None: ""}
    assert hashed == {flag(f): expected[declared(f, "output")] for f in dataclasses.fields(BuildConfig)}


def test_qvl_data_alone_prints_its_help_and_a_mistyped_command_gets_a_suggestion():
    assert "Commands:" in CliRunner().invoke(main, []).output
    result = CliRunner().invoke(main, ["buidl"])
    assert (
        result.exit_code == 2 and result.output.count("\n") == 1 and "Did you mean 'build'?" in result.output
    )
