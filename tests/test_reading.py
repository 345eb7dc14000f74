"""Reading dataset files as LLaMA-Factory does: JSON Lines in a .json file, a BOM, a folder of files;
an empty file says so; the build's progress shows a true rate."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from helpers import chat

from qvl_data.build import build
from qvl_data.cli import main
from qvl_data.config import BuildConfig
from qvl_data.shards import ShardSet

ROWS = [{"messages": chat(f"question {i}", f"answer {i}")} for i in range(5)]
SHAREGPT = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}


def _dataset(root: Path, files: dict[str, bytes], file_name: str | None = None) -> Path:
    """A dataset ``d`` whose file_name is ``file_name`` (default: the only file), files written as given."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    info = {"d": {"file_name": file_name or next(iter(files)), **SHAREGPT}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _lines(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _build(root: Path, out: Path):
    return build(BuildConfig(dataset_dir=str(root), dataset="d", out=str(out), num_proc=1, quiet=True))


def _answers(out: Path) -> list[str]:
    rows = ShardSet(out)
    return [rows.row(i)["id"] for i in range(len(rows))]


def test_json_file_holding_json_lines_is_read(tmp_path: Path):
    root = _dataset(tmp_path / "data", {"d.json": _lines(ROWS)})
    result = _build(root, tmp_path / "out")
    assert result.manifest.totals.rows == 5 and result.manifest.totals.rejected == 0


def test_utf8_bom_is_accepted_in_json_and_json_lines(tmp_path: Path):
    bom = b"\xef\xbb\xbf"
    for name, data in {"d.json": json.dumps(ROWS).encode(), "d.jsonl": _lines(ROWS)}.items():
        root = _dataset(tmp_path / name, {name: bom + data})
        result = _build(root, tmp_path / f"out-{name}")
        assert result.manifest.totals.rows == 5 and result.manifest.totals.rejected == 0, name


def test_folder_file_name_reads_every_data_file_in_name_order(tmp_path: Path):
    files = {
        "parts/b.jsonl": _lines(ROWS[2:]),
        "parts/a.json": json.dumps(ROWS[:2]).encode(),
        "parts/notes.txt": b"not data",
    }
    root = _dataset(tmp_path / "data", files, file_name="parts")
    out = tmp_path / "out"
    result = _build(root, out)
    assert result.manifest.totals.rows == 5
    assert _answers(out) == [f"d:{i}" for i in range(5)]  # a.json's rows, then b.jsonl's, indexed on
    assert [Path(p.file).name for p in result.manifest.partitions] == ["a.json", "b.jsonl"]


def _cli_build(root: Path, out: Path):
    args = ["build", "--dataset-dir", str(root), "--dataset", "d", "--out", str(out), "--quiet"]
    return CliRunner().invoke(main, args)


def test_empty_file_says_it_is_empty(tmp_path: Path):
    for name, data in {"zero.json": b"", "blank.jsonl": b"\n  \n", "bom.json": b"\xef\xbb\xbf"}.items():
        root = _dataset(tmp_path / name, {name: data})
        result = _cli_build(root, tmp_path / f"out-{name}")
        assert result.exit_code == 2, result.output
        assert f"{name}: the file is empty" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_empty_list_is_a_dataset_without_rows(tmp_path: Path):
    root = _dataset(tmp_path / "data", {"d.json": b"[]"})
    result = _build(root, tmp_path / "out")
    assert result.manifest.input_rows == 0 and result.manifest.shards == []


def test_folder_without_data_files_is_one_line(tmp_path: Path):
    root = _dataset(tmp_path / "data", {"parts/readme.md": b"x"}, file_name="parts")
    result = _cli_build(root, tmp_path / "out")
    assert result.exit_code == 2 and "folder holds no .json or .jsonl data files" in result.output


def test_lone_object_is_not_a_list_of_rows(tmp_path: Path):
    root = _dataset(tmp_path / "data", {"d.json": json.dumps(ROWS[0]).encode()})
    result = _cli_build(root, tmp_path / "out")
    assert result.exit_code == 2 and "expected a JSON list of rows (or JSON Lines" in result.output


def test_progress_rate_is_rows_over_elapsed_time():
    """22 rows done 9 s after the start is 2.4 rows/s (rich's own speed estimate showed 48,882)."""
    from qvl_data.build import _progress

    clock = [100.0]
    progress, bar = _progress(22, quiet=False, label="building", get_time=lambda: clock[0])
    progress.start_task(bar)
    clock[0] = 109.0
    progress.update(bar, advance=22, images=9)
    from qvl_data.progress import rates_text

    # the bar's rates column and the plain lines off a terminal both show these
    assert rates_text(progress.tasks[0], {"images": "img/s"}) == "2.4 rows/s 1.0 img/s"
