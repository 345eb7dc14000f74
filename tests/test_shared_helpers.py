"""One home for shared helpers: cache publishing and the rejected.jsonl line."""

from __future__ import annotations

import json
from pathlib import Path

from qvl_data.config import DEMO_DATASETS, BuildConfig
from qvl_data.demo import DEMO_DATASETS as DEMO_NAMES
from qvl_data.files import publish_directory, staging_directory
from qvl_data.schema import Rejection, rejection_line


def _staged(out: Path, marker: str) -> Path:
    tmp = staging_directory(out)
    assert tmp.parent == out.parent and tmp.name.startswith(f".{out.name}.tmp-") and not any(tmp.iterdir())
    (tmp / "done").write_text(marker)
    return tmp


def test_publish_directory_replaces_incomplete_and_keeps_complete(tmp_path: Path):
    out = tmp_path / "cache" / "entry"
    complete = lambda d: (d / "done").is_file()  # noqa: E731

    first = _staged(out, "first")
    publish_directory(first, out, complete)
    assert (out / "done").read_text() == "first" and not first.exists()

    # A concurrent builder that finished second keeps the complete entry and leaves its own to delete.
    second = _staged(out, "second")
    publish_directory(second, out, complete)
    assert (out / "done").read_text() == "first" and second.exists()

    # An incomplete entry (a killed earlier attempt) or a stray file is replaced.
    (out / "done").unlink()
    third = _staged(out, "third")
    publish_directory(third, out, complete)
    assert (out / "done").read_text() == "third"
    stray = tmp_path / "cache" / "file-entry"
    stray.write_text("not a directory")
    publish_directory(_staged(stray, "fourth"), stray, complete)
    assert (stray / "done").read_text() == "fourth"
    assert not list(out.parent.glob(".*.old-*"))


def test_rejection_line_is_one_json_object_per_line():
    r = Rejection(
        "mine", 3, "control_token", "mine.json row 3: field output contains <|im_end|>\nx", "/d/mine.json"
    )
    line = rejection_line(r)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "source": "mine",
        "index": 3,
        "reason": "control_token",
        "message": "mine.json row 3: field output contains <|im_end|>\nx",
        "file": "/d/mine.json",
    }


def test_demo_dataset_list_has_one_home():
    assert DEMO_DATASETS == ",".join(DEMO_NAMES) == BuildConfig().dataset
