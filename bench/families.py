"""Benchmark 5 (informational): build rows/s of Qwen3-VL against Qwen2.5-VL on the same synthetic set, in one
run. Both builds use the offline default processor of their family (``--model qwen2.5-vl`` / ``qwen3-vl``)
and the same options; Qwen3-VL's 16-px patches, 0.5 mean/std and 65,536-pixel minimum change the image work.
Each build runs twice and the faster is kept (the first also pays the processor's first build and load).

    python bench/families.py --rows 500 --num-proc 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import caption, machine_info, print_table, write_results
from bench.make_synthetic import DATASET, make_synthetic

FAMILIES = ("qwen2.5-vl", "qwen3-vl")


def build_seconds(dataset_dir: Path, model: str, num_proc: int, out: Path) -> dict:
    """One full build of the set with ``--model model``: wall seconds, rows, image tokens."""
    from qvl_data.build import build
    from qvl_data.config import BuildConfig

    started = time.perf_counter()
    result = build(
        BuildConfig(
            dataset_dir=str(dataset_dir),
            dataset=DATASET,
            model=model,
            out=str(out),
            num_proc=num_proc,
            quiet=True,
        )
    )
    seconds = time.perf_counter() - started
    totals = result.manifest.totals
    return {"model": model, "seconds": seconds, "rows": totals.rows, "image_tokens": totals.image_tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--json", default="bench/results/families.json")
    args = parser.parse_args(argv)
    dataset_dir = make_synthetic(args.rows, quiet=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="qvl-bench-families-") as tmp:
        for model in FAMILIES:
            # twice each, the faster kept: the first also pays the processor's first build and load
            timed = []
            for _ in range(2):
                out = Path(tmp) / model
                timed.append(build_seconds(dataset_dir, model, args.num_proc, out))
                shutil.rmtree(out)
            runs.append(min(timed, key=lambda r: r["seconds"]))
    base = runs[0]["seconds"]
    rows = [
        [
            r["model"],
            f"{r['seconds']:.1f}",
            f"{r['rows'] / r['seconds']:.1f}",
            f"{r['image_tokens']:,}",
            f"{r['seconds'] / base:.2f}x",
        ]
        for r in runs
    ]
    print_table(
        f"build of synthetic-{args.rows} (num_proc {args.num_proc})",
        ["--model", "seconds", "rows/s", "image tokens", "time vs qwen2.5-vl"],
        rows,
        caption(machine_info()),
    )
    write_results(
        args.json, {"rows": args.rows, "num_proc": args.num_proc, "runs": runs, "machine": machine_info()}
    )


if __name__ == "__main__":
    main()
