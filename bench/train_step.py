"""Benchmark 3: seconds per optimizer step of the tiny Qwen2.5-VL on CPU, qvl_train's loop vs transformers.Trainer.

    python bench/train_step.py            # ~5 min on 2 cores
    python bench/train_step.py --smoke    # seconds; what tests/test_bench_smoke.py runs

Same model, same LoRA, same rows in the same micro-batch order, same accumulation, micro-batch 1, same
gradient checkpointing, same data-loader workers, one process each, each configuration in a fresh process:

* ``qvl``: ``qvl_train.loop.train(TrainConfig(model="tiny", ...))`` -- the real loop, its data loader over
  the qvl shards (uint8 pixels expanded on the device); seconds per step from its own ``trainer_log.jsonl``
  (``elapsed_s`` is taken right after each optimizer step).
* ``HF Trainer + on the fly`` (the LLaMA-Factory path): ``transformers.Trainer`` on the model that
  ``qvl_train.model.load_model`` returns (so model, LoRA and checkpointing are identical), fed by
  ``bench/baselines.py``'s on-the-fly dataset (open JPEG + image processor + tokenize per row) in the
  trainer's epoch-0 order with a sequential sampler; seconds per step between ``on_step_end`` callbacks.
* ``HF Trainer + qvl shards``: the same Trainer fed from the qvl shards (``ShardDataset`` + ``collate`` +
  ``to_device``): separates what the loop saves from what the data path saves.
* ``qvl + qvl shards, packed`` (skip with ``--no-packing``): the same loop with ``--packing`` over the same
  rows (packs of at most the build's cutoff_len, 2048 tokens; SDPA with the block-diagonal mask), one pack
  per micro-batch and accumulation 1, for one epoch. Its steps hold other numbers of rows than the unpacked
  runs', so compare it by trained tokens/s (the same trained tokens either way), not by seconds per step.

The first ``--warmup-steps`` steps (worker start-up, allocator warm-up) are excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable, not bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import common
from bench.common import DATA_DIR, fmt, fmt_bytes, fmt_ratio, ratio

NAME = "train_step"
TARGET = 0.9  # qvl seconds per step / HF Trainer seconds per step
PACKED = "qvl shards, packed"


def train_config(cfg: dict[str, Any], output_dir: str):
    """The qvl TrainConfig shared by every configuration (fields this qvl_train lacks are left out)."""
    from qvl_train.config import TrainConfig

    values = {
        "model": "tiny",
        "data": cfg["data"],
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": cfg["grad_accum"],
        "max_steps": cfg["steps"],
        "warmup_steps": 1,
        "lr_scheduler_type": "cosine",
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_steps": 0,
        "plot_loss": False,
        "dataloader_num_workers": cfg["workers"],
        "device": "cpu",
        "cpu_dtype": "float32",
        "gradient_checkpointing": cfg["gradient_checkpointing"],
        "max_rows": cfg["rows"],
        "seed": cfg["seed"],
    }
    if cfg.get("packing"):  # the same rows, one epoch, one pack per optimizer step
        values.update(packing=True, gradient_accumulation_steps=1, max_steps=0, num_train_epochs=1.0)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


# ------------------------------------------------------------------------------------------- children


def child_qvl(cfg: dict[str, Any]) -> dict[str, Any]:
    import contextlib
    import io

    from qvl_train.loop import LOG_FILE, train

    with tempfile.TemporaryDirectory(prefix="qvl-bench-train-") as tmp:
        tc = train_config(cfg, tmp)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train(tc)
        total = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(tmp) / LOG_FILE).read_text().splitlines() if line]
    elapsed = [r["elapsed_s"] for r in records]
    step_s = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return {
        "step_s": step_s,
        "trained_tokens": [r["trained_tokens"] for r in records],
        "losses": [r["loss"] for r in records],
        "total_s": total,
        "params": summary.get("params"),
    }


def _step_tokens(data: str, rows: int, seed: int, grad_accum: int, steps: int) -> list[int]:
    """Trained tokens (shifted labels != IGNORE_INDEX) of each optimizer step, in the trainer's order."""
    import numpy as np

    from qvl_data.shards import ShardSet
    from qvl_data.template import IGNORE_INDEX
    from qvl_train.data import rank_rows

    shards = ShardSet(data, columns=["labels"])
    order = rank_rows(rows, 0, seed, 0, 1)
    per_row = [
        int((np.asarray(shards.row(i, ("labels",))["labels"][1:]) != IGNORE_INDEX).sum()) for i in order
    ]
    return [sum(per_row[s * grad_accum : (s + 1) * grad_accum]) for s in range(steps)]


def child_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import SequentialSampler, Subset
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from qvl_train.checkpoint import seed_everything
    from qvl_train.data import ShardDataset, collate, rank_rows
    from qvl_train.model import load_model, tiny_model_dir
    from qvl_train.steps import to_device

    hf_logging.set_verbosity_error()
    tiny_model_dir()
    with tempfile.TemporaryDirectory(prefix="qvl-bench-hf-") as tmp:
        tc = train_config(cfg, tmp)
        seed_everything(cfg["seed"])
        device = torch.device("cpu")
        model = load_model(tc, device, torch.float32)  # identical model, LoRA and checkpointing
        rows = cfg["rows"]
        order = rank_rows(rows, 0, cfg["seed"], 0, 1)  # qvl's epoch-0 order, replayed sequentially
        if cfg["data_path"] == "on the fly":
            from bench.baselines import OnTheFlyDataset, collate_on_the_fly, read_rows

            raw = read_rows(cfg["raw"], [cfg["dataset"]])[:rows]
            dataset, collator = Subset(OnTheFlyDataset(raw), order), collate_on_the_fly
        else:
            shards = ShardDataset(cfg["data"], rows)

            def collator(items: list[dict[str, Any]]) -> dict[str, Any]:
                batch = collate(items)
                inputs = to_device(batch, device, torch.float32, shards.processor)
                return {**inputs, "labels": batch["labels"]}

            dataset = Subset(shards, order)

        times: list[float] = []

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                times.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.perf_counter())

        class SequentialTrainer(Trainer):
            def _get_train_sampler(self, train_dataset=None):
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=cfg["grad_accum"],
            max_steps=cfg["steps"],
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=cfg["workers"],
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=cfg["seed"],
        )
        trainer = SequentialTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Clock()]
        )
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_s = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "step_s": step_s,
        "trained_tokens": _step_tokens(cfg["data"], rows, cfg["seed"], cfg["grad_accum"], cfg["steps"]),
        "losses": losses,
        "total_s": total,
    }


CHILDREN = {"qvl": child_qvl, "HF Trainer": child_hf}


# ------------------------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The raw rows and their qvl build: the first steps x accumulation rows of the synthetic set (or the
    6-row ``mllm_demo`` set, short rows with small images, for the smoke run)."""
    from qvl_data.build import build
    from qvl_data.config import BuildConfig

    rows = args.steps * args.grad_accum
    if args.workload == "mllm_demo":
        from qvl_data.demo import fetch_demo_data

        raw = fetch_demo_data()
        out = args.data_dir / "builds" / "mllm_demo-uint8"
    else:
        from bench.make_synthetic import make_synthetic

        seed = args.data_seed
        raw = make_synthetic(rows, seed, args.data_dir / f"synthetic-{rows}-s{seed}", quiet=True)
        out = args.data_dir / "builds" / f"synthetic-{rows}-uint8"
    build(BuildConfig(dataset_dir=str(raw), dataset=args.workload, out=str(out), quiet=True))
    return raw, out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    info = common.machine_info()
    raw, data = prepare(args)
    base = {
        "data": str(data),
        "raw": str(raw),
        "dataset": args.workload,
        "rows": args.steps * args.grad_accum,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "workers": args.workers,
        "seed": args.seed,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
    }
    configs = [("qvl", "qvl shards"), ("HF Trainer", "on the fly"), ("HF Trainer", "qvl shards")]
    if not args.no_packing:
        configs.append(("qvl", PACKED))
    results = []
    for loop, data_path in configs:
        if args.only and loop not in args.only:
            continue
        cfg = {**base, "loop": loop, "data_path": data_path, "packing": data_path == PACKED}
        print(f"[train_step] {loop} + {data_path} ...", flush=True)
        in_process = CHILDREN[loop] if args.in_process else None
        r = common.run_child(Path(__file__), cfg, in_process=in_process)
        w = min(args.warmup_steps, len(r["step_s"]) - 1)
        measured = r["step_s"][w:]
        tokens = r["trained_tokens"][w : w + len(measured)]
        r.update(
            loop=loop,
            data_path=data_path,
            packing=cfg["packing"],
            warmup_steps=w,
            s_per_step=sum(measured) / len(measured),
            trained_tokens_per_s=sum(tokens) / sum(measured),
        )
        print(
            f"[train_step]   {r['s_per_step']:.2f} s/step, {r['trained_tokens_per_s']:.0f} trained tok/s",
            flush=True,
        )
        results.append(r)
    return {"benchmark": NAME, "machine": info, "args": vars(args), "results": results}


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    results, checks = payload["results"], []
    qvl = next((r for r in results if r["loop"] == "qvl" and not r.get("packing")), None)
    for r in results:  # packed steps hold other rows: no time ratio for them
        r["vs_qvl"] = ratio(r["s_per_step"], qvl["s_per_step"]) if qvl and not r.get("packing") else None
    for r in results:
        if r["loop"] == "HF Trainer" and qvl:
            x = ratio(qvl["s_per_step"], r["s_per_step"])
            checks.append(
                {
                    "target": f"qvl s/step / HF Trainer + {r['data_path']} s/step",
                    "goal": f"<= {TARGET}x",
                    "measured": x,
                    "met": x is not None and x <= TARGET,
                }
            )
    packed = next((r for r in results if r.get("packing")), None)
    if qvl and packed:
        checks.append(
            {
                "target": "qvl packed / unpacked trained tokens/s, same rows (CPU; the gain is a GPU's)",
                "goal": "(informational)",
                "measured": ratio(packed["trained_tokens_per_s"], qvl["trained_tokens_per_s"]),
                "met": None,
            }
        )
    payload["checks"] = checks
    return payload


def print_tables(payload: dict[str, Any]) -> None:
    a = payload["args"]
    rows = [
        [
            r["loop"],
            r["data_path"],
            len(r["step_s"]) - r["warmup_steps"],
            fmt(r["s_per_step"], 2),
            fmt(r["trained_tokens_per_s"], 0),
            fmt(r["losses"][0], 4) if r.get("losses") else "-",
            fmt(r["total_s"], 1),
            fmt_bytes(r["process"]["peak_rss_bytes"]),
            fmt_ratio(r.get("vs_qvl")),
        ]
        for r in payload["results"]
    ]
    common.print_table(
        f"bench/train_step.py: tiny Qwen2.5-VL LoRA on CPU, {a['workload']}, micro-batch 1, accumulation "
        f"{a['grad_accum']} (packed: 1 pack, accumulation 1), {a['workers']} loader workers",
        [
            "loop",
            "data",
            "steps timed",
            "s / step",
            "trained tok/s",
            "first loss",
            "total s",
            "peak RSS",
            "time vs qvl",
        ],
        rows,
        common.caption(payload["machine"]),
    )
    common.print_checks(payload["checks"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.bench_parser(NAME, __doc__)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps not timed")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (qvl_train's default, 0)")
    parser.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, dropout, row order)")
    parser.add_argument(
        "--data-seed", type=int, default=0, help="seed of the synthetic set (as the other benchmarks)"
    )
    parser.add_argument("--workload", choices=["synthetic", "mllm_demo"], default="synthetic")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--only", help="comma-separated loops to run (qvl, HF Trainer)")
    parser.add_argument(
        "--no-packing", action="store_true", help="skip the packed qvl configuration (--packing)"
    )
    common.add_child_options(parser)
    args = parser.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x] if args.only else None
    if args.smoke:
        args.steps, args.warmup_steps, args.grad_accum, args.workers = 1, 0, 2, 0
        args.workload = "mllm_demo"
        args.in_process = True
    args.data_dir = args.data_dir or (DATA_DIR / "smoke" if args.smoke else DATA_DIR)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return common.bench_main(
        NAME, parse_args(argv), run_all, summarize, print_tables, child=lambda cfg: CHILDREN[cfg["loop"]](cfg)
    )


if __name__ == "__main__":
    main()
