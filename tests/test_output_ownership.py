"""Commands that write a file beside the build (convert, validate --report, notebook --out) replace only
their own earlier output, atomically; reading commands refuse files that are not regular."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from helpers import chat, write_dataset

from qvl_data.cli import main
from qvl_data.qa_notebook import MARK, NOTEBOOK, is_qa_notebook
from qvl_data.shards import load_manifest

FOREIGN = b"my own file, not qvl's\n"


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", "mine", [{"messages": chat("hi", "hello")}, {"messages": "x"}])


def _refused(result, path: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "never overwrites" in lines[0], result.output


def _convert(data: Path, out: Path):
    return CliRunner().invoke(
        main, ["convert", "--dataset-dir", str(data), "--dataset", "mine", "--out", str(out)]
    )


def test_convert_replaces_its_own_output_and_refuses_any_other_file(data: Path, tmp_path: Path):
    out = tmp_path / "unified.parquet"
    assert _convert(data, out).exit_code == 0
    first = out.read_bytes()
    assert _convert(data, out).exit_code == 0 and out.read_bytes() == first  # its own: replaced

    mine = tmp_path / "mine.parquet"
    mine.write_bytes(FOREIGN)
    _refused(_convert(data, mine), mine)
    assert mine.read_bytes() == FOREIGN and not (tmp_path / "mine.rejected.jsonl").exists()

    other = tmp_path / "other.parquet"
    (tmp_path / "other.rejected.jsonl").write_bytes(FOREIGN)
    _refused(_convert(data, other), tmp_path / "other.rejected.jsonl")
    assert not other.exists() and (tmp_path / "other.rejected.jsonl").read_bytes() == FOREIGN


def test_validate_report_replaces_its_own_report_and_refuses_any_other_file(data: Path, tmp_path: Path):
    args = ["validate", "--dataset-dir", str(data), "--dataset", "mine", "--num-proc", "1", "--quiet"]
    report = tmp_path / "report.jsonl"
    assert CliRunner().invoke(main, [*args, "--report", str(report)]).exit_code == 1
    assert [json.loads(line)["index"] for line in report.read_text().splitlines()] == [1]
    assert CliRunner().invoke(main, [*args, "--report", str(report)]).exit_code == 1  # its own: replaced
    mine = tmp_path / "notes.jsonl"
    mine.write_bytes(FOREIGN)
    _refused(CliRunner().invoke(main, [*args, "--report", str(mine)]), mine)
    assert mine.read_bytes() == FOREIGN and not list(tmp_path.glob("*.tmp*"))  # no temporary file left


def test_notebook_refuses_an_existing_file_it_did_not_write(demo_build: Path, tmp_path: Path):
    mine = tmp_path / "analysis.ipynb"
    mine.write_bytes(FOREIGN)
    _refused(CliRunner().invoke(main, ["notebook", str(demo_build), "--out", str(mine)]), mine)
    assert mine.read_bytes() == FOREIGN
    nb = nbformat.v4.new_notebook()
    nbformat.write(nb, mine)
    assert not is_qa_notebook(mine)  # a notebook, but not one qvl wrote
    nb.metadata["qvl"] = {"notebook": MARK}
    nbformat.write(nb, mine)
    assert is_qa_notebook(mine)
    earlier = nbformat.read(NOTEBOOK, as_version=4)  # what a qvl that did not mark its output wrote
    nbformat.write(earlier, mine)
    assert is_qa_notebook(mine)


def test_stats_and_inspect_refuse_a_fifo_shard(demo_build: Path, tmp_path: Path):
    out = tmp_path / "o"
    manifest = load_manifest(demo_build)
    (out / "shards").mkdir(parents=True)
    (out / "manifest.json").write_bytes((demo_build / "manifest.json").read_bytes())
    for shard in manifest.shards:
        os.mkfifo(out / shard.file)
    for command in ("stats", "inspect"):
        result = subprocess.run(
            [sys.executable, "-m", "qvl_data.cli", command, str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{out / manifest.shards[0].file}: listed in the manifest but is a FIFO" in result.stderr


def test_the_one_replace_rule_refuses_inputs_links_folders_and_foreign_files(tmp_path: Path):
    from qvl_data.errors import QvlError
    from qvl_data.files import refuse_foreign

    def ours(path: Path) -> bool:
        return path.read_bytes() == b"ours"

    (tmp_path / "ours.txt").write_bytes(b"ours")
    (tmp_path / "mine.txt").write_bytes(FOREIGN)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refuse_foreign(tmp_path / "new.txt", ours, "list", "--out")  # a new file
    refuse_foreign(tmp_path / "ours.txt", ours, "list", "--out")  # its own earlier output
    refuse_foreign(tmp_path / "mine.txt", ours, "list", "--out", overwrite=True)
    refused = {
        "mine.txt": (
            {},
            "exists and is not a list qvl wrote, and qvl never overwrites a file it did not write: "
            "choose another --out or remove the file",
        ),
        "mine.txt ": ({"overwrite": False}, "choose another --out or pass --overwrite to replace it"),
        "ours.txt": (
            {"overwrite": True, "inputs": [tmp_path]},
            f"is inside {tmp_path}, which this command reads",
        ),
        "dangling": ({"overwrite": True}, "the list is a broken symbolic link, not a file qvl can replace"),
        "": ({"overwrite": True}, "the list is a folder, not a file qvl can replace"),
    }
    for name, (options, message) in refused.items():
        with pytest.raises(QvlError, match=re.escape(message)):
            refuse_foreign(tmp_path / name.strip(), ours, "list", "--out", **options)
    assert (tmp_path / "mine.txt").read_bytes() == FOREIGN


def test_a_second_convert_into_the_same_file_says_who_holds_it(data: Path, tmp_path: Path):
    from qvl_data.convert import lock_path
    from qvl_data.lock import exclusive_lock

    out = tmp_path / "unified.parquet"
    with exclusive_lock(lock_path(out), out, "qvl-data convert"):  # a first convert, still running
        result = _convert(data, out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"another qvl-data convert is writing here (pid {os.getpid()} on " in result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    lock_path(out).unlink()
    assert _convert(data, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "unified.parquet", "unified.rejected.jsonl"]
