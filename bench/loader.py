"""Benchmark 2: collated multimodal batches per second delivered to a training step, qvl shards vs on the fly.

    python bench/loader.py                # synthetic 2,000 rows; ~5-8 min on 2 cores
    python bench/loader.py --scaling      # + a full pass over 20,000 rows (memory must stay flat)
    python bench/loader.py --smoke        # seconds; what tests/test_bench_smoke.py runs

Sources, each with 0 and 2 data-loader workers, each configuration in a fresh process:

* ``qvl uint8`` / ``qvl webp`` / ``qvl float32``: ``qvl_train.data``'s ``ShardDataset`` + ``RankBatchSampler``
  + ``collate`` in a ``torch.utils.data.DataLoader`` exactly as ``qvl_train.loop`` builds it, then
  ``to_device`` (the uint8 -> float32 expansion of the pixels runs there, on the training device; on this
  CPU machine it is part of the measured time). webp shards are decoded in the dataset (the workers);
* ``on the fly``: ``bench/baselines.py``'s ``OnTheFlyDataset`` + ``collate_on_the_fly`` (LLaMA-Factory /
  TRL / axolotl style): every read opens the JPEGs, pre-resizes them, runs the transformers image processor
  and tokenizes the templated turns; float32 ``pixel_values`` come out of the collator.

Both worker counts run in the same invocation, and a check says whether ``qvl-train``'s default
``dataloader_num_workers`` (0) is the fastest measured for each qvl source: with workers, every batch
crosses a process boundary (shared-memory files and a socket per tensor), which costs more than a qvl row
takes to read, so the trainer loads in its own process by default.

All sources read the same rows in the same order (the trainer's seeded permutation of the first
``--rows`` rows) and the first batch of every configuration is hashed: the tensors must be identical.
Throughput runs start with their source's files in the page cache (read once, untimed, beforehand) and
exclude the first batches (worker start-up, reported as "first batch"). A full pass over
every row of the uint8 build measures the loader's memory: ``anon`` is its heap, ``RSS``/``PSS`` also count
the shard pages the process has mapped in (qvl reads rows with ``pread`` and releases what locating them
touched, so these stay small).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import common
from bench.common import DATA_DIR, fmt, fmt_bytes, fmt_ratio, ratio

NAME = "loader"
TARGET_SPEEDUP = 10.0
TARGET_RSS_GROWTH = 1.10


# ------------------------------------------------------------------------------------------- children


def _digest(batch: dict[str, Any]) -> str:
    h = hashlib.sha1()
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        value = batch.get(key)
        if value is not None:
            h.update(key.encode())
            h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _tree_memory() -> dict[str, int]:
    totals = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for pid in common.tree_pids(os.getpid()):
        mem = common.process_memory(pid, pss=False)
        for k in totals:
            totals[k] += mem.get(k, 0)
    return totals


def _qvl_loader(cfg: dict[str, Any]):
    import torch

    from qvl_train.data import RankBatchSampler, ShardDataset
    from qvl_train.steps import batch_to_inputs, make_loader

    dataset = ShardDataset(cfg["data"], cfg["rows"])
    sampler = RankBatchSampler(len(dataset), cfg["batch_size"], 0, 1, cfg["seed"])
    device = torch.device("cpu")
    loader = make_loader(dataset, sampler, device, cfg["workers"], cfg["seed"])  # the trainer's own loader

    def deliver(batch: dict[str, Any]) -> dict[str, Any]:
        return batch_to_inputs(batch, device, torch.float32, dataset.processor)

    return loader, deliver, len(dataset)


def _on_the_fly_loader(cfg: dict[str, Any]):
    import torch

    from bench.baselines import OnTheFlyDataset, collate_on_the_fly, read_rows
    from qvl_train.data import rank_rows

    rows = read_rows(cfg["dataset_dir"], [cfg["dataset"]])
    if cfg["rows"]:
        rows = rows[: cfg["rows"]]
    order = rank_rows(len(rows), 0, cfg["seed"], 0, 1)  # the trainer's epoch-0 order
    bs = cfg["batch_size"]
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    loader = torch.utils.data.DataLoader(
        OnTheFlyDataset(rows),
        batch_sampler=batches,
        collate_fn=collate_on_the_fly,
        num_workers=cfg["workers"],
    )
    return loader, (lambda batch: batch), len(rows)


def child_loader(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    make = _qvl_loader if cfg["source"].startswith("qvl") else _on_the_fly_loader
    started = time.perf_counter()
    loader, deliver, rows = make(cfg)
    times, fetch, digest, delivered_rows, pixels = [], [], None, 0, 0
    checkpoints: list[dict[str, int]] = []  # the tree's memory at every tenth of the pass
    marks = {max(1, round(k * len(loader) / 10)) for k in range(1, 11)}
    memory_after_warmup: dict[str, int] = {}
    limit = cfg.get("max_batches") or None
    t = time.perf_counter()
    for i, batch in enumerate(loader):
        got = time.perf_counter()
        inputs = deliver(batch)  # qvl: to_device (uint8 -> float32 here); on the fly: nothing left to do
        now = time.perf_counter()
        times.append(now - t)
        fetch.append(got - t)
        t = now
        if i == 0:  # qvl's to_device passes no mask for right-padded batches: hash the collated one
            digest = _digest({"attention_mask": batch.get("attention_mask"), **inputs})
        if i == cfg["warmup"]:
            memory_after_warmup = _tree_memory()
        if i + 1 in marks:
            checkpoints.append({"batch": i + 1, **_tree_memory()})
        delivered_rows += inputs["input_ids"].shape[0]
        if inputs.get("pixel_values") is not None:
            pixels += inputs["pixel_values"].shape[0]
        if limit and i + 1 >= limit:
            break
    total = time.perf_counter() - started
    warm = cfg["warmup"]
    steady = times[warm:] if len(times) > warm else times
    steady_fetch = fetch[warm:] if len(fetch) > warm else fetch
    return {
        "rows": rows,
        "batches": len(times),
        "delivered_rows": delivered_rows,
        "patches": pixels,
        "first_batch_s": times[0] if times else None,
        "steady_batches": len(steady),
        "steady_s": sum(steady),
        "batches_per_s": len(steady) / sum(steady) if steady and sum(steady) > 0 else None,
        "fetch_ms_per_batch": 1e3 * sum(steady_fetch) / max(len(steady_fetch), 1),
        "deliver_ms_per_batch": 1e3 * (sum(steady) - sum(steady_fetch)) / max(len(steady), 1),
        "total_s": total,
        "first_batch_digest": digest,
        "memory_after_warmup": memory_after_warmup,
        "memory_checkpoints": checkpoints,
        "memory_end": _tree_memory(),
    }


# ------------------------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic set(s) and their qvl builds (reused when the fingerprint matches)."""
    from bench.make_synthetic import make_synthetic
    from qvl_data.build import build
    from qvl_data.config import BuildConfig

    kw = {"unique_images": 6, "min_side": 100, "max_side": 700} if args.smoke else {}

    def synthetic(rows: int) -> Path:
        return make_synthetic(
            rows, args.seed, args.data_dir / f"synthetic-{rows}-s{args.seed}", quiet=True, **kw
        )

    def built(dataset_dir: Path, name: str, pixel_format: str) -> Path:
        out = args.data_dir / "builds" / name
        print(f"[loader] qvl build {out} (skipped when up to date) ...", flush=True)
        config = BuildConfig(
            dataset_dir=str(dataset_dir),
            dataset="synthetic",
            out=str(out),
            num_proc=args.build_num_proc,
            pixel_format=pixel_format,
            quiet=True,
        )
        build(config)
        return out

    full = synthetic(args.rows)
    sets = {
        "raw": full,
        "uint8": built(full, f"synthetic-{args.rows}-uint8", "uint8"),
        "webp": built(full, f"synthetic-{args.rows}-webp", "webp"),
    }
    sub = synthetic(args.measure_rows) if args.measure_rows < args.rows else full
    sub_name = f"synthetic-{args.rows}-float32" + (
        f"-first{args.measure_rows}" if args.measure_rows < args.rows else ""
    )
    sets["float32"] = built(sub, sub_name, "float32")
    if args.scaling:
        big = synthetic(args.scaling_rows)
        sets["raw_scaling"] = big
        sets["uint8_scaling"] = built(big, f"synthetic-{args.scaling_rows}-uint8", "uint8")
    return sets


def warm_page_cache(root: Path) -> int:
    """Read every file under ``root`` once (untimed) so a throughput run starts with its data in the page
    cache, as in a second epoch over a set that fits in RAM; otherwise the rate depends on whatever earlier
    runs (tens of GB of builds) left cached. Returns the bytes read."""
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


def run_config(args: argparse.Namespace, source: str, workers: int, data: Path, rows: int, kind: str) -> dict:
    cfg = {
        "source": source,
        "data": str(data),
        "dataset_dir": str(data),
        "dataset": "synthetic",
        "rows": rows,
        "workers": workers,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "warmup": max(3, 2 * workers),
        "max_batches": 0,
    }
    print(f"[loader] {kind}: {source}, {workers} workers, {rows or 'all'} rows ...", flush=True)
    warmed = warm_page_cache(data) if kind == "throughput" else 0
    in_process = child_loader if args.in_process else None
    result = common.run_child(Path(__file__), cfg, in_process=in_process)
    result.update(source=source, workers=workers, kind=kind, batch_size=args.batch_size, warmed_bytes=warmed)
    p = result["process"]
    print(
        f"[loader]   {fmt(result['batches_per_s'], 2)} batches/s, first batch {fmt(result['first_batch_s'], 2)} s, "
        f"peak RSS {fmt_bytes(p['peak_rss_bytes'])}, anon {fmt_bytes(p['peak_anon_bytes'])}",
        flush=True,
    )
    return result


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    info = common.machine_info()
    sets = prepare(args)
    results = []
    for workers in args.workers:
        for source, data in (
            ("qvl uint8", sets["uint8"]),
            ("qvl webp", sets["webp"]),
            ("qvl float32", sets["float32"]),
            ("on the fly", sets["raw"]),
        ):
            results.append(run_config(args, source, workers, data, args.measure_rows, "throughput"))
    if not args.no_full_pass:
        for workers in args.workers:
            results.append(run_config(args, "qvl uint8", workers, sets["uint8"], 0, f"full pass {args.rows}"))
            if args.scaling:
                results.append(
                    run_config(
                        args, "qvl uint8", workers, sets["uint8_scaling"], 0, f"full pass {args.scaling_rows}"
                    )
                )
    return {"benchmark": NAME, "machine": info, "args": vars(args), "results": results}


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    results, checks = payload["results"], []
    throughput = [r for r in results if r["kind"] == "throughput"]
    digests = {r["first_batch_digest"] for r in throughput}
    checks.append(
        {
            "target": "all sources deliver identical first batches",
            "goal": "1 digest",
            "measured": f"{len(digests)} digest(s)",
            "met": len(digests) == 1,
        }
    )
    for workers in payload["args"]["workers"]:
        base = next((r for r in throughput if r["source"] == "on the fly" and r["workers"] == workers), None)
        for r in throughput:
            if r["workers"] == workers:
                r["vs_baseline"] = ratio(r["batches_per_s"], base["batches_per_s"]) if base else None
                if r["source"] != "on the fly":
                    checks.append(
                        {
                            "target": f"{r['source']} batches/s vs on the fly, {workers} workers",
                            "goal": f">= {TARGET_SPEEDUP:g}x",
                            "measured": r["vs_baseline"],
                            "met": (r["vs_baseline"] or 0) >= TARGET_SPEEDUP,
                        }
                    )
    passes = [r for r in results if r["kind"].startswith("full pass")]
    for workers in payload["args"]["workers"]:
        mine = sorted((r for r in passes if r["workers"] == workers), key=lambda r: r["rows"])
        for r in mine:
            points = r.get("memory_checkpoints") or []
            anon = [p["RssAnon"] for p in points]
            half = len(anon) // 2
            median = statistics.median
            r["anon_growth_in_pass"] = ratio(median(anon[half:]), median(anon[:half])) if half else None
            checks.append(
                {
                    "target": f"anon memory, median over the 2nd half of the pass / 1st half, {r['rows']} rows, "
                    f"{workers} workers",
                    "goal": f"<= {TARGET_RSS_GROWTH:.2f}x",
                    "measured": r["anon_growth_in_pass"],
                    "met": (r["anon_growth_in_pass"] or 99) <= TARGET_RSS_GROWTH,
                }
            )
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            for key in ("peak_anon_bytes", "peak_pss_bytes", "peak_rss_bytes"):
                r = ratio(large["process"][key], small["process"][key])
                checks.append(
                    {
                        "target": f"{key.replace('_bytes', '')} {large['rows']} / {small['rows']} rows, {workers} workers",
                        "goal": f"<= {TARGET_RSS_GROWTH:.2f}x",
                        "measured": r,
                        "met": (r or 99) <= TARGET_RSS_GROWTH,
                    }
                )
    checks.extend(worker_checks(throughput))
    payload["checks"] = checks
    return payload


def worker_checks(throughput: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per qvl source: is qvl-train's default worker count the fastest of those measured in this run?
    (With workers each batch crosses a process boundary; the default is 0 because that costs more than a
    qvl row takes to read. See ``dataloader_num_workers`` in ``qvl-train --help``.)"""
    from qvl_train.config import TrainConfig

    default = TrainConfig().dataloader_num_workers
    checks = []
    for source in sorted({r["source"] for r in throughput if r["source"].startswith("qvl")}):
        rates = {r["workers"]: r["batches_per_s"] or 0.0 for r in throughput if r["source"] == source}
        if default not in rates or len(rates) < 2:
            continue
        best = max(rates, key=lambda w: rates[w])
        measured = ", ".join(f"{w} workers {rates[w]:.0f}/s" for w in sorted(rates))
        checks.append(
            {
                "target": f"{source}: qvl-train's default ({default} workers) is the fastest",
                "goal": f"{default} workers",
                "measured": measured,
                "met": rates[default] >= rates[best],
            }
        )
    return checks


def print_tables(payload: dict[str, Any]) -> None:
    rows = []
    for r in payload["results"]:
        p = r["process"]
        rows.append(
            [
                r["kind"],
                r["source"],
                r["workers"],
                r["rows"],
                r["batch_size"],
                fmt(r["batches_per_s"], 2),
                fmt(r["first_batch_s"], 2),
                fmt(r["total_s"], 1),
                fmt_bytes(p["peak_rss_bytes"]),
                fmt_bytes(p["peak_pss_bytes"]),
                fmt_bytes(p["peak_anon_bytes"]),
                fmt(r.get("fetch_ms_per_batch"), 1),
                fmt(r.get("deliver_ms_per_batch"), 1),
                r["first_batch_digest"],
                fmt_ratio(r.get("vs_baseline")),
            ]
        )
    common.print_table(
        "bench/loader.py: batches delivered to the training step (CPU), qvl shards vs on the fly",
        [
            "run",
            "source",
            "workers",
            "rows",
            "batch",
            "batches/s",
            "first batch s",
            "total s",
            "peak RSS tree",
            "peak PSS tree",
            "peak anon",
            "wait for loader ms",
            "to_device ms",
            "first batch sha1",
            "vs on the fly",
        ],
        rows,
        common.caption(payload["machine"]),
    )
    common.print_checks(payload["checks"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.bench_parser(NAME, __doc__)
    parser.add_argument("--rows", type=int, default=2000, help="synthetic rows (full pass)")
    parser.add_argument("--measure-rows", type=int, default=300, help="rows read by the throughput runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per batch (the trainer's default 1)")
    parser.add_argument("--workers", default="0,2", help="comma-separated data-loader worker counts")
    parser.add_argument("--build-num-proc", type=int, default=0, help="num_proc of the qvl builds it needs")
    parser.add_argument("--scaling", action="store_true", help="also a full pass over --scaling-rows")
    parser.add_argument("--scaling-rows", type=int, default=20000)
    parser.add_argument("--no-full-pass", action="store_true", help="skip the full-pass memory runs")
    common.add_child_options(parser)
    args = parser.parse_args(argv)
    args.workers = [int(x) for x in str(args.workers).split(",") if x]
    if args.smoke:
        args.rows, args.measure_rows, args.scaling_rows = 8, 6, 12
        args.workers = [0]
        args.in_process = True
    args.data_dir = args.data_dir or (DATA_DIR / "smoke" if args.smoke else DATA_DIR)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return common.bench_main(NAME, parse_args(argv), run_all, summarize, print_tables, child=child_loader)


if __name__ == "__main__":
    main()
