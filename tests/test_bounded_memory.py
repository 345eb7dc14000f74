"""A Parquet partition task holds only its own row groups in memory, not the file.

Measured as the peak resident set (Linux ``VmHWM``, reset first through ``/proc/self/clear_refs``, so
the imports' own peak does not hide the read) of a fresh subprocess, above its resident set before, while it reads
one partition of a ~40 MB file, after a warm-up read of another partition, (8 row groups of incompressible embedded bytes). A hard cap with
``resource.setrlimit`` was not used: RLIMIT_AS counts pyarrow/jemalloc's virtual reservations (it fails
on a tiny read), and RLIMIT_DATA does not bound memory-mapped reads, so neither tells "read its rows"
from "read the file" honestly. The same subprocess reading the whole file is the control: it must grow
by about the file size, which shows the measurement sees a whole read (the test fails if a task did).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS, ROW_BYTES, GROUP = 80, 512 * 1024, 10

SCRIPT = """
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from qvl_data.partition import index_dataset, make_plan, partition_rows

path, mode = sys.argv[1], sys.argv[2]
plan = make_plan([index_dataset("big", path, 10, str(Path(path).parent))])
def kib(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1])

# Warm up on another partition first: pyarrow's first read loads code pages and thread pools
# (~25 MB resident) that are no part of the data read.
list(partition_rows(plan[0]))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident set
before = kib("VmRSS")
if mode == "task":
    n = sum(len(row["images"][0]["bytes"]) for _, row in partition_rows(plan[3]))
else:
    n = sum(len(row["images"][0]["bytes"]) for row in pq.read_table(path).to_pylist())
after = kib("VmHWM")
print(json.dumps({"grew": (after - before) * 1024, "bytes": n, "partitions": len(plan)}))
"""


def _measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), mode], check=True, capture_output=True)
    return json.loads(out.stdout)


def test_a_parquet_task_reads_only_its_row_groups_not_the_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "a"}],
            "images": [{"bytes": rng.bytes(ROW_BYTES), "path": None}],
        }
        for _ in range(ROWS)
    ]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=GROUP, compression="none")
    del rows
    size = path.stat().st_size
    assert size > 40e6 and pq.ParquetFile(path).metadata.num_row_groups == ROWS // GROUP

    task = _measure(path, "task")
    assert task["partitions"] == ROWS // GROUP and task["bytes"] == GROUP * ROW_BYTES
    whole = _measure(path, "whole")
    assert whole["bytes"] == ROWS * ROW_BYTES
    assert whole["grew"] > 0.8 * size, whole  # the control: a whole read shows up
    assert task["grew"] < 0.3 * size, (task, size)  # one row group (1/8 of the file) and its copy
