"""``.txt`` files read as LLaMA-Factory's ``txt`` (``datasets``' ``text`` builder): one row per line,
column ``text``, indexed by line offsets in one streamed pass and partitioned by byte range."""

import json

from qvl_data.partition import index_dataset, make_plan, partition_rows
from qvl_data.sources import ReadOptions, iter_records, resolve_datasets

TEXT = "first line\r\n\nthird é line\n" + "".join(f"row {i}\n" for i in range(3, 40)) + "last, no newline"


def _rows(tmp_path, partition_rows_option: int) -> list:
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    plan = make_plan([index_dataset("t", str(path), partition_rows_option, str(tmp_path))])
    return [row for p in plan for row in partition_rows(p)], plan


def test_text_file_rows_are_its_lines_however_it_is_partitioned(tmp_path):
    whole, plan_one = _rows(tmp_path, 1000)
    split, plan_many = _rows(tmp_path, 7)
    assert len(plan_one) == 1 and len(plan_many) == 6
    assert whole == split
    # the rows datasets' text builder gives (universal newlines, then one row per line)
    assert [r["text"] for _, r in whole] == TEXT.replace("\r\n", "\n").splitlines()
    assert [i for i, _ in whole] == list(range(41))


def test_text_folder_builds_records_with_the_text_column(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\nworld\n")
    (folder / "b.txt").write_bytes(b"bad \xff byte\n")
    info = {"t": {"file_name": "texts", "columns": {"prompt": "text", "response": "text"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    items = list(iter_records(resolve_datasets(tmp_path, ["t"]), ReadOptions(dataset_dir=tmp_path)))
    assert [r["messages"][0]["content"] for r in items[:2]] == ["hello", "world"]
    assert items[2].reason == "invalid_row" and "not UTF-8" in items[2].message
