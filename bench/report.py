"""Markdown tables from the benchmarks' JSON results, for bench/README.md.

python bench/report.py                    # print the tables of every bench/results/<name>.json
python bench/report.py --update-readme    # replace the generated section of bench/README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, RESULTS_DIR, fmt, fmt_bytes, fmt_ratio
from bench.gpu_step import packing_table_rows

README = REPO / "bench" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
COMMANDS = {
    "build": "python bench/build.py",
    "build-scaling": "python bench/build.py --scaling --workloads synthetic --no-baseline --no-sizes --num-proc 2 "
    "--out bench/results/build-scaling.json",  # an older, separate scaling run; --scaling now goes with build
    "loader": "python bench/loader.py",
    "train_step": "python bench/train_step.py",
    "gpu_step": "python bench/gpu_step.py",
}


def table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(payload: dict[str, Any]) -> str:
    m, v = payload["machine"], payload["machine"]["versions"]
    device = f"; device: {m['device']}" if m.get("device") else ""
    return (
        f"*{m['date']}; {m['cpu']}, {m['usable_cores']} cores, {m['ram_gib']} GiB RAM; load average {m['load_avg_1m']} "
        f"at start; python {m['python']}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"datasets {v.get('datasets')}, peft {v.get('peft')}; git {m['git']}{device}; "
        f"{payload.get('total_s', 0):.0f} s in all.*"
    )


def checks_table(payload: dict[str, Any]) -> str:
    rows = []
    for c in payload.get("checks", []):
        measured = c.get("display") or c["measured"]
        if isinstance(measured, float):
            measured = f"{100 * measured:.1f}%" if "MFU" in c["target"] else fmt_ratio(measured)
        where = f"{c['workload']}: " if c.get("workload") else ""
        verdict = "-" if c["met"] is None else "met" if c["met"] else "**missed**"  # None: informational
        rows.append([where + c["target"], c["goal"], measured, verdict])
    return table(["target", "goal", "measured", ""], rows)


def build_section(p: dict[str, Any]) -> str:
    rows = [
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
            fmt_bytes(r["process"]["peak_rss_bytes"]),
            fmt_bytes(r["process"]["peak_pss_bytes"]),
            fmt_bytes(r["output_bytes"]),
            fmt_ratio(r.get("vs_baseline")),
            fmt(1e3 * r["driver_cpu_s"] / r["input_rows"], 2) if "driver_cpu_s" in r else "-",
            fmt(1e3 * r["task_cpu_s"] / r["input_rows"], 1) if "task_cpu_s" in r else "-",
            fmt_bytes(r.get("driver_peak_rss_bytes")),
            f"{r['reused']}/{r['partitions']}" if "partitions" in r else "-",
        ]
        for r in p["results"]
    ]
    main = table(
        [
            "workload",
            "method",
            "num_proc",
            "pixels",
            "rows",
            "rows/s",
            "images/s",
            "tokens/s",
            "seconds",
            "peak RSS (tree)",
            "peak PSS (tree)",
            "output",
            "rows/s vs datasets.map",
            "driver ms CPU/row",
            "task ms CPU/row",
            "driver peak RSS",
            "reused/partitions",
        ],
        rows,
    )
    sizes = table(
        [
            "workload",
            "rows",
            "images",
            "uint8 pixels",
            "webp pixels",
            "float32 pixels",
            "uint8 / float32",
            "webp / float32",
            "datasets.map cache",
        ],
        [
            [
                s["workload"],
                s["rows"],
                s["images"],
                fmt_bytes(s["uint8_pixel_bytes_per_image"]),
                fmt_bytes(s.get("webp_pixel_bytes_per_image")),
                fmt_bytes(s["float32_pixel_bytes_per_image"]),
                f"1/{s['float32_pixel_bytes_per_image'] / s['uint8_pixel_bytes_per_image']:.1f}",
                f"1/{s['float32_pixel_bytes_per_image'] / s['webp_pixel_bytes_per_image']:.1f}"
                if s.get("webp_pixel_bytes_per_image")
                else "-",
                fmt_bytes(s["datasets_map_bytes_per_image"]),
            ]
            for s in p["sizes"]
        ],
    )
    return f"{main}\n\nBytes per image (same rows):\n\n{sizes}"


def build_scaling_section(p: dict[str, Any]) -> str:
    rows = [
        [
            r["workload"],
            r["method"],
            r["num_proc"],
            r["pixel_format"],
            r["rows"],
            fmt(r["rows_per_s"]),
            fmt(r["pipeline_s"]),
            fmt_bytes(r["process"]["peak_rss_bytes"]),
            fmt_bytes(r["process"]["peak_pss_bytes"]),
            fmt_bytes(r["process"]["peak_anon_bytes"]),
            fmt_bytes(r["output_bytes"]),
        ]
        for r in p["results"]
    ]
    return table(
        [
            "workload",
            "method",
            "num_proc",
            "pixels",
            "rows",
            "rows/s",
            "seconds",
            "peak RSS",
            "peak PSS",
            "peak anon",
            "output",
        ],
        rows,
    )


def loader_section(p: dict[str, Any]) -> str:
    rows = [
        [
            r["kind"],
            r["source"],
            r["workers"],
            r["rows"],
            fmt(r["batches_per_s"], 2),
            fmt(r["first_batch_s"], 2),
            fmt_bytes(r["process"]["peak_rss_bytes"]),
            fmt_bytes(r["process"]["peak_pss_bytes"]),
            fmt_bytes(r["process"]["peak_anon_bytes"]),
            fmt(r.get("fetch_ms_per_batch"), 1),
            fmt(r.get("deliver_ms_per_batch"), 1),
            fmt_ratio(r.get("vs_baseline")),
        ]
        for r in p["results"]
    ]
    return table(
        [
            "run",
            "source",
            "workers",
            "rows",
            "batches/s",
            "first batch s",
            "peak RSS",
            "peak PSS",
            "peak anon",
            "wait for loader ms/batch",
            "to_device ms/batch",
            "vs on the fly",
        ],
        rows,
    )


def train_section(p: dict[str, Any]) -> str:
    rows = [
        [
            r["loop"],
            r["data_path"],
            len(r["step_s"]) - r["warmup_steps"],
            fmt(r["s_per_step"], 2),
            fmt(r["trained_tokens_per_s"], 0),
            fmt_bytes(r["process"]["peak_rss_bytes"]),
            fmt_ratio(r.get("vs_qvl")),
        ]
        for r in p["results"]
    ]
    a = p["args"]
    head = (
        f"{a['workload']} rows, micro-batch 1, gradient accumulation {a['grad_accum']}, {a['workers']} loader "
        f"workers, {a['steps']} steps of which the first {a['warmup_steps']} untimed.\n\n"
    )
    return head + table(
        ["loop", "data", "steps timed", "s / step", "trained tokens/s", "peak RSS", "time vs qvl"], rows
    )


def gpu_section(p: dict[str, Any]) -> str:
    rows = [
        [
            r["loop"],
            fmt(r["s_per_step"], 3),
            fmt(r["tokens_per_s"], 0),
            fmt(r["model_tflops_per_s"], 1),
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
            fmt_bytes(r["peak_allocated_bytes"]),
            fmt_ratio(r.get("time_vs_qvl")),
        ]
        for r in p["results"]
    ]
    out = table(
        ["loop", "s / step", "tokens/s", "model TFLOP/s", "MFU", "peak GPU memory", "time vs qvl"], rows
    )
    packing = p.get("packing")
    if packing:  # 8 short rows one by one vs the same rows packed into one sequence
        out += (
            f"\n\nPacking: {packing['rows']} rows of {packing['row_len']} tokens "
            f"({packing['image_tokens_per_row']} image tokens each), {packing['trained_tokens_per_step']} trained "
            f"tokens per optimizer step, checkpointing {'on' if packing['checkpointing'] else 'off'}:\n\n"
        )
        out += table(
            [
                "configuration",
                "attention",
                "s / step",
                "tokens/s",
                "trained tokens/s",
                "MFU",
                "peak GPU memory",
            ],
            packing_table_rows(packing),
        )
    return out


SECTIONS = {
    "build": build_section,
    "build-scaling": build_scaling_section,
    "loader": loader_section,
    "train_step": train_section,
    "gpu_step": gpu_section,
}


def render(results_dir: Path = RESULTS_DIR) -> str:
    parts = []
    for name, section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        note = f" Note: {payload['note']}." if payload.get("note") else ""
        command = COMMANDS[name]
        if name in ("build", "loader") and payload["args"].get("scaling"):
            command += " --scaling"
        parts.append(
            f"#### `{command}`\n\n{machine_line(payload)}{note}\n\n{section(payload)}\n\nTargets:\n\n{checks_table(payload)}"
        )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--update-readme", action="store_true", help=f"replace the section between {START} and {END}"
    )
    args = parser.parse_args(argv)
    text = render(args.results_dir)
    if args.update_readme:
        readme = README.read_text()
        head, _, rest = readme.partition(START)
        _, _, tail = rest.partition(END)
        README.write_text(f"{head}{START}\n{text}{END}{tail}")
        print(f"updated {README}")
    else:
        print(text)


if __name__ == "__main__":
    main()
