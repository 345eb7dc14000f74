"""Where the time goes: profile one benchmark configuration and print its top functions.

    python bench/hotspots.py build-qvl --rows 200          # qvl-data build, num_proc 1
    python bench/hotspots.py build-qvl --rows 400 --num-proc 2
    python bench/hotspots.py build-datasets-map --rows 200
    python bench/hotspots.py loader-qvl --rows 300         # qvl uint8 shards, 0 workers
    python bench/hotspots.py loader-on-the-fly --rows 100
    python bench/hotspots.py train-qvl / train-hf          # tiny model, 3 steps

The configuration is the benchmark's own child (``bench/<script>.py --child ...``), so the profile is of
exactly the code that was timed. With py-spy installed (``pip install py-spy``; optional, the benchmarks
never need it) the whole process tree is sampled (``--subprocesses``: pool workers and data-loader workers
included) and C extensions show up under the Python function that called them; without it, cProfile
profiles the main process only. Output: top functions by own ("self") and inclusive samples, plus the
raw profile under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import common
from bench.common import DATA_DIR, REPO, RESULTS_DIR

#: The per-row work of each target (py-spy samples outside it are start-up: imports, processor load).
FOCUS = {
    "build-qvl": "_encode_items",
    "build-datasets-map": "encode_row",
    "loader-qvl": "child_loader",
    "loader-on-the-fly": "child_loader",
    "train-qvl": "run_window",
    "train-hf": "training_step",
}


#: Frames that only run in a worker process (multiprocessing pool, data-loader worker).
WORKER_ENTRIES = {"BaseProcess.run", "_worker_loop"}


def child_command(target: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    """The benchmark child (script + config) that ``target`` names, with its data prepared."""
    from bench.make_synthetic import make_synthetic
    from qvl_data.build import build
    from qvl_data.config import BuildConfig

    raw = make_synthetic(args.rows, args.seed, DATA_DIR / f"synthetic-{args.rows}-s{args.seed}", quiet=True)
    if target.startswith("build"):
        kind = "qvl" if target == "build-qvl" else "datasets.map"
        cfg = {
            "kind": kind,
            "dataset_dir": str(raw),
            "dataset": "synthetic",
            "out": str(tmp / "out"),
            "num_proc": args.num_proc,
            "pixel_format": "uint8" if kind == "qvl" else "float32",
        }
        script = "build.py"
    else:
        shards = DATA_DIR / "builds" / f"synthetic-{args.rows}-uint8"
        build(BuildConfig(dataset_dir=str(raw), dataset="synthetic", out=str(shards), quiet=True))
        if target.startswith("loader"):
            cfg = {
                "source": "qvl uint8" if target == "loader-qvl" else "on the fly",
                "data": str(shards) if target == "loader-qvl" else str(raw),
                "dataset_dir": str(raw),
                "dataset": "synthetic",
                "rows": 0,
                "workers": args.workers,
                "batch_size": 1,
                "seed": args.seed,
                "warmup": 0,
                "max_batches": 0,
            }
            script = "loader.py"
        else:
            cfg = {
                "loop": "qvl" if target == "train-qvl" else "HF Trainer",
                "data_path": "qvl shards" if target == "train-qvl" else "on the fly",
                "data": str(shards),
                "raw": str(raw),
                "dataset": "synthetic",
                "rows": args.rows,
                "grad_accum": max(1, args.rows // 3),
                "steps": 3,
                "workers": args.workers,
                "seed": args.seed,
                "gradient_checkpointing": True,
            }
            script = "train_step.py"
    result = tmp / "result.json"
    return [
        sys.executable,
        str(REPO / "bench" / script),
        "--child",
        json.dumps(cfg),
        "--child-result",
        str(result),
    ]


def parse_raw(path: Path, focus: str | None = None) -> tuple[Counter, Counter, int, Counter]:
    """py-spy ``--format raw`` (folded stacks) -> (self samples, inclusive samples, total samples) by function;
    with ``focus``, only the stacks that pass through a function whose name contains it."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    processes: Counter = Counter()  # all samples (not only the focus): main process vs workers
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        names = {f.split(" (")[0] for f in frames}
        processes["workers" if names & WORKER_ENTRIES else "main process"] += n
        if not frames or (focus and not any(focus in f.split(" (")[0] for f in frames)):
            continue
        total += n
        own[_short(frames[-1])] += n
        for name in {_short(f) for f in frames}:
            inclusive[name] += n
    return own, inclusive, total, processes


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(REPO) + "/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "target",
        choices=[
            "build-qvl",
            "build-datasets-map",
            "loader-qvl",
            "loader-on-the-fly",
            "train-qvl",
            "train-hf",
        ],
    )
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--focus",
        help="only stacks through a function whose name contains this (default: the per-row work of the "
        "target: encode_record, encode_row, ...; 'all' for everything, start-up and imports included)",
    )
    args = parser.parse_args(argv)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qvl-hotspots-", dir=DATA_DIR) as tmp:
        profile(args, child_command(args.target, args, Path(tmp)))


def profile(args: argparse.Namespace, cmd: list[str]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"profile-{args.target}.txt"
    env = common.child_env()
    if shutil.which("py-spy"):
        spy = ["py-spy", "record", "--subprocesses", "-r", str(args.rate), "-f", "raw", "-o", str(out), "--"]
        subprocess.run(spy + cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        focus = None if args.focus == "all" else (args.focus or FOCUS.get(args.target))
        own, inclusive, total, processes = parse_raw(out, focus)
        where = f" in stacks through {focus!r}" if focus else ""
        print(f"py-spy, {total} samples{where} over the process tree ({args.rate}/s); raw profile: {out}")
        cpu = ", ".join(f"{k} {n / args.rate:.1f} s" for k, n in processes.items())
        print(f"on-CPU time over all stacks (start-up included): {cpu}")
        for title, counter in (("self", own), ("inclusive", inclusive)):
            print(f"\ntop {args.top} by {title} samples:")
            for name, n in counter.most_common(args.top):
                print(f"  {100 * n / max(total, 1):5.1f}%  {name}")
    else:
        pstats_file = out.with_suffix(".pstats")
        subprocess.run(
            [sys.executable, "-m", "cProfile", "-o", str(pstats_file), *cmd[1:]],
            cwd=REPO,
            env=env,
            check=True,
        )
        import pstats

        print(f"cProfile (main process only; pip install py-spy for the whole tree): {pstats_file}")
        stats = pstats.Stats(str(pstats_file))
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
