"""``qvl-data convert`` is atomic and says what it checked."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from helpers import chat, write_dataset

from qvl_data.cli import main


def _convert(dataset_dir: Path, datasets: str, out: Path):
    args = ["convert", "--dataset-dir", str(dataset_dir), "--dataset", datasets, "--out", str(out)]
    return CliRunner().invoke(main, args)


def test_convert_names_its_rejected_file_and_says_images_are_not_decoded(tmp_path: Path):
    data = write_dataset(tmp_path / "data", "mine", [{"messages": chat("hi", "hello")}, {"messages": "x"}])
    out = tmp_path / "out" / "unified.parquet"
    result = _convert(data, "mine", out)
    assert result.exit_code == 0, result.output
    rejected = tmp_path / "out" / "unified.rejected.jsonl"
    assert f"wrote 1 rows to {out}; 1 rejected, listed in {rejected}" in result.output
    assert "images were not decoded" in result.output
    assert [json.loads(line)["index"] for line in rejected.read_text().splitlines()] == [1]


def test_failed_convert_leaves_no_tmp_and_keeps_the_previous_output(tmp_path: Path):
    data = write_dataset(tmp_path / "data", "mine", [{"messages": chat("hi", "hello")}, {"messages": "x"}])
    out_dir = tmp_path / "out"
    out = out_dir / "unified.parquet"
    assert _convert(data, "mine", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert set(before) == {"unified.parquet", "unified.rejected.jsonl"}

    # A second dataset whose JSON breaks after the first dataset's rows were already streamed out.
    info = json.loads((data / "dataset_info.json").read_text())
    info["broken"] = {"file_name": "broken.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    (data / "broken.json").write_text("[{oops")
    result = _convert(data, "mine,broken", out)
    assert result.exit_code == 2 and "invalid JSON" in result.output and "Traceback" not in result.output
    after = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert after == before  # no *.tmp, the previous Parquet and rejected list intact
