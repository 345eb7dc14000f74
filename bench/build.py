"""Benchmark 1: ``qvl-data build`` against a hand-written ``datasets.map`` script, same rows, same run.

    python bench/build.py                 # demo (1096 rows) + synthetic 2,000 rows; ~10-15 min on 2 cores
    python bench/build.py --scaling       # + synthetic 20,000 rows (qvl, uint8): memory must stay flat
    python bench/build.py --smoke         # seconds; what tests/test_bench_smoke.py runs

For every workload, each configuration runs in a fresh process (peaks never mix) whose whole process
tree's memory is sampled from /proc:

* ``qvl``: ``qvl_data.build.build(BuildConfig(...))`` -- exactly what ``qvl-data build`` runs -- with uint8
  pixels at each ``--num-proc``, plus a webp build (lossless WebP per image) and a float32 build for the
  bytes per image;
* ``datasets.map``: the usual hand-written script (``bench/baselines.py``): ``Dataset.from_list(rows)
  .map(fn, num_proc=...)`` where ``fn`` opens the images with PIL, pre-resizes them like LLaMA-Factory,
  calls the transformers image processor, expands ``<image>`` and tokenizes the templated turns, storing
  float32 ``pixel_values`` in an Arrow cache file, as users do.

Rates use the pipeline time (after the imports, including the processor load); ``wall`` is the whole
process. The uint8 and webp builds are kept under ``data/bench/builds/`` for ``bench/loader.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa

from bench import common
from bench.common import DATA_DIR, fmt, fmt_bytes, fmt_ratio, ratio

NAME = "build"
DEMO_DATASETS = "mllm_demo,identity,alpaca_en_demo"
TARGETS = {
    "num_proc_scaling": 1.8,  # rows/s at num_proc 2 over num_proc 1
    "vs_datasets_map": 1.5,  # rows/s over the hand-written datasets.map at the same num_proc
    "rss_growth": 1.10,  # peak memory at 20k rows over 2k rows
    "pixels_over_float32": 1 / 15,  # bytes per image
}


# ------------------------------------------------------------------------------------------- children


def _import_transformers() -> None:
    """transformers imports its submodules lazily, on first use: import the classes both sides use before
    the clock starts, so that neither side's time holds seconds of imports."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil  # noqa: F401


def child_qvl(cfg: dict[str, Any]) -> dict[str, Any]:
    _import_transformers()

    from qvl_data.build import build
    from qvl_data.config import BuildConfig

    config = BuildConfig(
        dataset_dir=cfg["dataset_dir"],
        dataset=cfg["dataset"],
        out=cfg["out"],
        num_proc=cfg["num_proc"],
        pixel_format=cfg["pixel_format"],
        force=True,
        quiet=True,
    )
    result = build(config)
    totals = result.manifest["totals"]
    return {
        "pipeline_s": result.seconds,
        "rows": totals["rows"],
        "tokens": totals["tokens"],
        "images": totals["images"],
        "rejected": totals["rejected"],
        "output_bytes": sum(s["bytes"] for s in result.manifest["shards"]),
    }


def child_datasets_map(cfg: dict[str, Any]) -> dict[str, Any]:
    import datasets  # noqa: F401  (imports before the clock starts)

    _import_transformers()

    from bench.baselines import build_with_datasets_map

    names = [n for n in cfg["dataset"].split(",") if n]
    return build_with_datasets_map(
        cfg["dataset_dir"], names, Path(cfg["out"]), cfg["num_proc"], new_fingerprint=cfg.get("fingerprint")
    )


CHILDREN = {"qvl": child_qvl, "datasets.map": child_datasets_map}


# ------------------------------------------------------------------------------------------- measures


def qvl_pixel_bytes(out_dir: Path, max_rows: int | None = None) -> tuple[int, int]:
    """(bytes of the stored pixel values, images) over the first ``max_rows`` rows of a qvl build."""
    import pyarrow.compute as pc

    from qvl_data.shards import ShardSet

    shards = ShardSet(out_dir, columns=["pixels", "image_grid_thw"])
    remaining = len(shards) if max_rows is None else min(max_rows, len(shards))
    total = images = 0
    for table in shards.tables:
        if remaining <= 0:
            break
        part = table.slice(0, min(remaining, table.num_rows))
        remaining -= part.num_rows
        for chunk in part.column("pixels").chunks:
            items = chunk.flatten()  # this chunk's patches (fixed-size lists) or WebP images (binary)
            if isinstance(items, pa.FixedSizeListArray):
                total += len(items) * items.type.list_size * items.type.value_type.bit_width // 8
            else:
                total += pc.sum(pc.binary_length(items)).as_py() or 0
        images += sum(len(g) for g in part.column("image_grid_thw").to_pylist())
    return total, images


# ------------------------------------------------------------------------------------------- parent


def workload_dirs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.make_synthetic import make_synthetic

    workloads = []
    if "demo" in args.workloads:
        from qvl_data.demo import fetch_demo_data

        demo = str(fetch_demo_data())
        names = "mllm_demo" if args.smoke else DEMO_DATASETS
        workloads.append({"name": "demo" if not args.smoke else "demo-mllm", "dir": demo, "dataset": names})
    if "synthetic" in args.workloads:
        kw = {"unique_images": 6, "min_side": 100, "max_side": 700} if args.smoke else {}

        def synthetic(rows: int) -> Path:
            return make_synthetic(
                rows, args.seed, args.data_dir / f"synthetic-{rows}-s{args.seed}", quiet=True, **kw
            )

        full = synthetic(args.rows)
        sub_rows = min(args.float32_rows, args.rows)
        sub = synthetic(sub_rows) if sub_rows < args.rows else full
        workloads.append(
            {
                "name": f"synthetic-{args.rows}",
                "dir": str(full),
                "dataset": "synthetic",
                "float32_dir": str(sub),
                "float32_rows": sub_rows,
            }
        )
        if args.scaling:
            big = synthetic(args.scaling_rows)
            workloads.append(
                {
                    "name": f"synthetic-{args.scaling_rows}",
                    "dir": str(big),
                    "dataset": "synthetic",
                    "scaling": True,
                }
            )
    return workloads


def run_config(
    kind: str,
    workload: dict,
    num_proc: int,
    pixel_format: str,
    out: Path,
    dataset_dir: str,
    args: argparse.Namespace,
) -> dict:
    cfg = {
        "kind": kind,
        "dataset_dir": dataset_dir,
        "dataset": workload["dataset"],
        "out": str(out),
        "num_proc": num_proc,
        "pixel_format": pixel_format,
        # smoke only: skip datasets' hashing of the tokenizer (seconds that say nothing in a smoke test)
        "fingerprint": "qvl-bench-smoke" if args.smoke else None,
    }
    label = f"{workload['name']}: {kind} num_proc={num_proc} {pixel_format}"
    print(f"[build] {label} ...", flush=True)
    in_process = CHILDREN[kind] if args.in_process else None
    result = common.run_child(Path(__file__), cfg, in_process=in_process)
    result.update(workload=workload["name"], method=kind, num_proc=num_proc, pixel_format=pixel_format)
    p = result["process"]
    seconds = result["pipeline_s"]
    result["rows_per_s"] = result["rows"] / seconds
    result["images_per_s"] = result["images"] / seconds
    result["tokens_per_s"] = result["tokens"] / seconds
    print(
        f"[build]   {seconds:.1f} s pipeline, {p['wall_s']:.1f} s wall, {result['rows_per_s']:.1f} rows/s, "
        f"peak PSS {fmt_bytes(p['peak_pss_bytes'])}",
        flush=True,
    )
    return result


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    info = common.machine_info()
    builds_dir = args.data_dir / "builds"
    tmp_dir = args.data_dir / "tmp"
    results: list[dict] = []
    sizes: list[dict] = []
    for wl in workload_dirs(args):
        procs = [max(args.num_proc)] if wl.get("scaling") else args.num_proc
        for n in procs:
            out = builds_dir / f"{wl['name']}-uint8"
            results.append(run_config("qvl", wl, n, "uint8", out, wl["dir"], args))
        if wl.get("scaling"):
            continue
        if not args.no_baseline:
            for n in args.baseline_num_proc:
                out = tmp_dir / f"{wl['name']}-datasets-map-{n}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    results.append(run_config("datasets.map", wl, n, "float32", out, wl["dir"], args))
                finally:
                    shutil.rmtree(out, ignore_errors=True)  # gigabytes of float32
        if args.no_sizes:
            continue
        # bytes per image: float32 on the same rows (a prefix of the synthetic set, or the whole demo)
        f32_rows = wl.get("float32_rows")
        f32_name = f"{wl['name']}-float32" + (
            f"-first{f32_rows}" if f32_rows and f32_rows < args.rows else ""
        )
        f32_out = builds_dir / f32_name
        f32_dir = wl.get("float32_dir", wl["dir"])
        f32 = run_config("qvl", wl, max(args.num_proc), "float32", f32_out, f32_dir, args)
        f32["rows_subset"] = f32_rows
        results.append(f32)
        webp_out = builds_dir / f"{wl['name']}-webp"
        webp = run_config("qvl", wl, max(args.num_proc), "webp", webp_out, wl["dir"], args)
        results.append(webp)
        u8_bytes, u8_images = qvl_pixel_bytes(builds_dir / f"{wl['name']}-uint8", f32["rows"])
        webp_bytes, webp_images = qvl_pixel_bytes(webp_out, f32["rows"])
        f32_bytes, f32_images = qvl_pixel_bytes(f32_out)
        u8_full = next(r for r in results if r["workload"] == wl["name"] and r["method"] == "qvl")
        base = [r for r in results if r["workload"] == wl["name"] and r["method"] == "datasets.map"]
        sizes.append(
            {
                "workload": wl["name"],
                "rows": f32["rows"],
                "images": f32_images,
                "uint8_pixel_bytes_per_image": u8_bytes / max(u8_images, 1),
                "float32_pixel_bytes_per_image": f32_bytes / max(f32_images, 1),
                "webp_pixel_bytes_per_image": webp_bytes / max(webp_images, 1),
                "uint8_shard_bytes_per_image": u8_full["output_bytes"] / max(u8_full["images"], 1),
                "webp_shard_bytes_per_image": webp["output_bytes"] / max(webp["images"], 1),
                "float32_shard_bytes_per_image": f32["output_bytes"] / max(f32["images"], 1),
                "datasets_map_bytes_per_image": base[0]["output_bytes"] / max(base[0]["images"], 1)
                if base
                else None,
            }
        )
        if not args.keep_float32:
            shutil.rmtree(f32_out, ignore_errors=True)
    return {"benchmark": NAME, "machine": info, "args": vars(args), "results": results, "sizes": sizes}


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the baseline and the targets (met / missed)."""
    results, checks = payload["results"], []

    def find(workload: str, method: str, n: int, fmt_: str) -> dict | None:
        for r in results:
            if (r["workload"], r["method"], r["num_proc"], r["pixel_format"]) == (workload, method, n, fmt_):
                return r
        return None

    args = payload["args"]
    lo, hi = min(args["num_proc"]), max(args["num_proc"])
    for workload in dict.fromkeys(r["workload"] for r in results):
        q_lo, q_hi = find(workload, "qvl", lo, "uint8"), find(workload, "qvl", hi, "uint8")
        if q_lo and q_hi and lo != hi:
            r = ratio(q_hi["rows_per_s"], q_lo["rows_per_s"])
            checks.append(
                {
                    "workload": workload,
                    "target": f"rows/s num_proc {lo} -> {hi}",
                    "goal": f">= {TARGETS['num_proc_scaling']}x",
                    "measured": r,
                    "met": r is not None and r >= TARGETS["num_proc_scaling"],
                }
            )
        for n in args["num_proc"]:
            q, b = find(workload, "qvl", n, "uint8"), find(workload, "datasets.map", n, "float32")
            if q and b:
                r = ratio(q["rows_per_s"], b["rows_per_s"])
                q["vs_baseline"] = r
                checks.append(
                    {
                        "workload": workload,
                        "target": f"rows/s vs datasets.map, num_proc {n}",
                        "goal": f">= {TARGETS['vs_datasets_map']}x",
                        "measured": r,
                        "met": r is not None and r >= TARGETS["vs_datasets_map"],
                    }
                )
                if q["tokens"] != b["tokens"]:
                    checks.append(
                        {
                            "workload": workload,
                            "target": "same tokens as the baseline",
                            "goal": str(b["tokens"]),
                            "measured": q["tokens"],
                            "met": False,
                        }
                    )
    scaling = [
        r for r in results if r["method"] == "qvl" and r["pixel_format"] == "uint8" and "-" in r["workload"]
    ]
    by_rows = {
        int(r["workload"].rsplit("-", 1)[1]): r for r in scaling if r["workload"].startswith("synthetic")
    }
    if len(by_rows) >= 2:
        small, large = by_rows[min(by_rows)], by_rows[max(by_rows)]
        if small["num_proc"] != large["num_proc"]:
            small = find(small["workload"], "qvl", large["num_proc"], "uint8") or small
        for key in ("peak_pss_bytes", "peak_rss_bytes", "peak_anon_bytes"):
            r = ratio(large["process"][key], small["process"][key])
            checks.append(
                {
                    "workload": f"{small['workload']} vs {large['workload']}",
                    "target": f"{key.replace('_bytes', '')} growth, num_proc {large['num_proc']}",
                    "goal": f"<= {TARGETS['rss_growth']:.2f}x",
                    "measured": r,
                    "met": r is not None and r <= TARGETS["rss_growth"],
                }
            )
    for s in payload["sizes"]:
        for stored in ("uint8", "webp"):
            r = ratio(s[f"{stored}_pixel_bytes_per_image"], s["float32_pixel_bytes_per_image"])
            checks.append(
                {
                    "workload": s["workload"],
                    "target": f"{stored} / float32 pixel bytes per image",
                    "goal": "<= 1/15",
                    "measured": r,
                    "display": f"1/{1 / r:.1f}" if r else "-",
                    "met": r is not None and r <= TARGETS["pixels_over_float32"],
                }
            )
    payload["checks"] = checks
    return payload


def print_tables(payload: dict[str, Any]) -> None:
    cap = common.caption(payload["machine"])
    rows = []
    for r in payload["results"]:
        p = r["process"]
        rows.append(
            [
                r["workload"],
                r["method"],
                r["num_proc"],
                r["pixel_format"],
                r["rows"],
                fmt(r["rows_per_s"]),
                fmt(r["images_per_s"]),
                fmt(r["tokens_per_s"], 0),
                fmt(r["pipeline_s"]),
                fmt(p["wall_s"]),
                fmt_bytes(p["peak_rss_bytes"]),
                fmt_bytes(p["peak_pss_bytes"]),
                fmt_bytes(r["output_bytes"]),
                fmt_ratio(r.get("vs_baseline")),
            ]
        )
    common.print_table(
        "bench/build.py: qvl-data build vs hand-written datasets.map",
        [
            "workload",
            "method",
            "proc",
            "pixels",
            "rows",
            "rows/s",
            "images/s",
            "tokens/s",
            "pipeline s",
            "wall s",
            "peak RSS tree",
            "peak PSS tree",
            "output",
            "vs baseline",
        ],
        rows,
        cap,
    )
    size_rows = [
        [
            s["workload"],
            s["rows"],
            s["images"],
            fmt_bytes(s["uint8_pixel_bytes_per_image"]),
            fmt_bytes(s["webp_pixel_bytes_per_image"]),
            fmt_bytes(s["float32_pixel_bytes_per_image"]),
            f"1/{s['float32_pixel_bytes_per_image'] / s['uint8_pixel_bytes_per_image']:.1f}",
            f"1/{s['float32_pixel_bytes_per_image'] / s['webp_pixel_bytes_per_image']:.1f}",
            fmt_bytes(s["uint8_shard_bytes_per_image"]),
            fmt_bytes(s["webp_shard_bytes_per_image"]),
            fmt_bytes(s["float32_shard_bytes_per_image"]),
            fmt_bytes(s["datasets_map_bytes_per_image"]),
        ]
        for s in payload["sizes"]
    ]
    common.print_table(
        "bytes per image (same rows)",
        [
            "workload",
            "rows",
            "images",
            "uint8 pixels",
            "webp pixels",
            "float32 pixels",
            "uint8/float32",
            "webp/float32",
            "uint8 shard",
            "webp shard",
            "float32 shard",
            "datasets.map cache",
        ],
        size_rows,
    )
    common.print_checks(payload["checks"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.bench_parser(NAME, __doc__)
    parser.add_argument("--rows", type=int, default=2000, help="synthetic rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-proc", default="1,2", help="comma-separated num_proc values")
    parser.add_argument("--baseline-num-proc", help="num_proc values of the baseline (default: --num-proc)")
    parser.add_argument("--workloads", default="demo,synthetic")
    parser.add_argument(
        "--float32-rows",
        type=int,
        default=200,
        help="rows of the synthetic set built as float32 (bytes per image)",
    )
    parser.add_argument("--scaling", action="store_true", help="also build --scaling-rows (memory vs rows)")
    parser.add_argument("--scaling-rows", type=int, default=20000)
    parser.add_argument("--no-baseline", action="store_true", help="skip the datasets.map baseline")
    parser.add_argument(
        "--no-sizes", action="store_true", help="skip the float32 and webp builds (bytes per image)"
    )
    parser.add_argument(
        "--keep-float32", action="store_true", help="keep the float32 builds (data/bench/builds)"
    )
    common.add_child_options(parser)
    args = parser.parse_args(argv)
    args.num_proc = [int(x) for x in str(args.num_proc).split(",") if x]
    args.baseline_num_proc = [
        int(x) for x in str(args.baseline_num_proc or "").split(",") if x
    ] or args.num_proc
    args.workloads = [w for w in args.workloads.split(",") if w]
    if args.smoke:
        args.rows, args.float32_rows, args.scaling_rows = 8, 4, 16
        args.num_proc, args.baseline_num_proc = (
            [1, 2],
            [1],
        )  # datasets' num_proc costs ~10 s of tokenizer pickling
        args.workloads = ["synthetic"]
        args.in_process = True
    args.data_dir = args.data_dir or (DATA_DIR / "smoke" if args.smoke else DATA_DIR)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return common.bench_main(
        NAME, parse_args(argv), run_all, summarize, print_tables, child=lambda cfg: CHILDREN[cfg["kind"]](cfg)
    )


if __name__ == "__main__":
    main()
