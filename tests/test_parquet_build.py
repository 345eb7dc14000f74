"""A Parquet dataset through the whole build: the same bytes on 1 and 2 workers, and a killed build
resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import chat, register_dataset, write_image

from qvl_data.build import build
from qvl_data.config import BuildConfig


def _outputs(out: Path) -> dict[str, bytes]:
    files = [out / "manifest.json", out / "rejected.jsonl", *sorted((out / "shards").iterdir())]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _parquet_dataset(root: Path, embedded: bool = False) -> Path:
    """48 chat rows in row groups of 10; every third has an image, a file path or (``embedded``) the
    same file's bytes in a ``{bytes, path}`` struct (the Hugging Face ``Image`` layout)."""
    root.mkdir()
    for k in range(3):
        write_image(root / f"img{k}.png", (60 + 20 * k, 40), seed=k)

    def image(k: int) -> str | dict:
        return {"bytes": (root / f"img{k}.png").read_bytes(), "path": None} if embedded else f"img{k}.png"

    rows = []
    for i in range(48):
        if i % 3 == 0:
            rows.append({"messages": chat(f"<image>what is {i}?", f"picture {i}"), "images": [image(i % 3)]})
        else:
            rows.append({"messages": chat(f"say {i}", f"{i}" * (1 + i % 5)), "images": []})
    rows[7]["messages"][1]["content"] = ""  # one rejection
    pq.write_table(pa.Table.from_pylist(rows), root / "chats.parquet", row_group_size=10)
    register_dataset(root, "chats", "chats.parquet")
    return root


def _config(root: Path, out: Path, num_proc: int) -> BuildConfig:
    return BuildConfig(
        dataset_dir=str(root), dataset="chats", out=str(out), num_proc=num_proc, partition_rows=4, quiet=True
    )


def test_parquet_build_is_byte_identical_on_1_and_2_workers_and_resumes_after_a_kill(tmp_path: Path):
    # images embedded in the Parquet rows: the harder case (file images are built byte-identically on any
    # executor in tests/test_scale_out.py)
    root = _parquet_dataset(tmp_path / "data", embedded=True)
    one = build(_config(root, tmp_path / "one", 1))
    assert one.manifest.input_rows == 48 and one.partitions == 12
    assert one.manifest.rejected.by_reason == {"empty_content": 1}
    build(_config(root, tmp_path / "two", 2))
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qvl_data.cli", "build", "--dataset-dir", str(root), "--dataset", "chats"]
    cmd += ["--out", str(out), "--partition-rows", "4", "--num-proc", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / ".qvl-build" / "parts"
    deadline = time.time() + 120
    while len(list(parts.glob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = build(_config(root, out, 2))
    assert resumed.reused >= min(3, len(list(parts.glob("*.json"))))
    assert _outputs(out) == _outputs(tmp_path / "one")
