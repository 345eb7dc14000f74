"""Held-out evaluation (qvl_train.evaluate and its wiring in the loop), tiny model on CPU: the split by row id
(the same for every world size and across a resume), eval loss and accuracy against a hand computation from
the model's full logits, no RNG drawn, one rank and two ranks agreeing, and a run with evaluation training
bit-identical adapters to one without.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qvl_data.errors import QvlError
from qvl_data.template import IGNORE_INDEX
from qvl_train.config import TrainConfig
from qvl_train.data import ShardDataset, collate, split_rows
from qvl_train.distributed import Dist
from qvl_train.evaluate import eval_batches, evaluate, make_eval_loader
from qvl_train.loop import train
from qvl_train.steps import to_device

CPU = torch.device("cpu")
IM_END, NEWLINE = 151645, 198  # the two tokens that close every answer: the most frequent trained labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def _same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- the split


def test_split_rows_is_disjoint_complete_ascending_and_deterministic(demo_build):
    train_rows, val_rows = split_rows(demo_build, 0.1, seed=42)
    assert len(val_rows) == 110 and len(train_rows) == 1096 - 110  # round(0.1 * 1096)
    assert sorted(train_rows + val_rows) == list(range(1096)) and not set(train_rows) & set(val_rows)
    assert train_rows == sorted(train_rows) and val_rows == sorted(val_rows)
    assert split_rows(demo_build, 0.1, seed=42) == (train_rows, val_rows)  # a fresh computation agrees
    assert split_rows(demo_build, 0.1, seed=7)[1] != val_rows  # the seed picks the rows

    # a count, within the first max_rows rows; a small fraction still holds out one row
    train8, val8 = split_rows(demo_build, 3, seed=42, max_rows=8)
    assert len(val8) == 3 and sorted(train8 + val8) == list(range(8))
    assert len(split_rows(demo_build, 0.01, seed=42, max_rows=8)[1]) == 1

    # held out by id, not position: each held-out row is among the n smallest seeded hashes of its build
    import hashlib

    ds = ShardDataset(demo_build, max_rows=8)
    keys = {i: hashlib.sha256(f"42:{ds[i]['source']}:{ds[i]['index']}".encode()).digest() for i in range(8)}
    assert val8 == sorted(sorted(range(8), key=keys.__getitem__)[:3])

    for too_many in (8, 9):
        with pytest.raises(QvlError, match="leaves none to train on"):
            split_rows(demo_build, too_many, seed=42, max_rows=8)


def test_eval_shards_cover_every_row_once_for_any_world_size():
    for rows in (0, 1, 5, 8):
        for world in (1, 2, 3, 4):
            for batch in (1, 2, 3):
                shares = [eval_batches(rows, batch, rank, world) for rank in range(world)]
                flat = [i for share in shares for b in share for i in b]
                assert sorted(flat) == list(range(rows))  # each row once: nothing padded, nothing dropped
                for share in shares:
                    items = [i for b in share for i in b]
                    assert items == sorted(items) and all(0 < len(b) <= batch for b in share)
                sizes = [sum(len(b) for b in share) for share in shares]
                assert max(sizes) - min(sizes) <= 1


def test_the_loaders_of_two_ranks_hold_the_validation_rows_once(demo_build):
    _, val_rows = split_rows(demo_build, 5, seed=42, max_rows=16)
    eval_set = ShardDataset(demo_build, rows=val_rows)
    seen = [
        [
            row
            for batch in make_eval_loader(eval_set, 2, Dist(rank=rank, world_size=2))
            for row, *_ in batch["rows"]
        ]
        for rank in (0, 1)
    ]
    assert sorted(seen[0] + seen[1]) == val_rows and len(seen[0]) == 3 and len(seen[1]) == 2


def test_dry_run_plans_train_rows_and_shows_eval_rows_for_every_world_size(demo_build, capsys):
    for world in (1, 2, 3):
        summary = train(
            TrainConfig(model="tiny", data=str(demo_build), val_size=0.1, world_size=world, dry_run=True)
        )
        assert summary["eval_rows"] == 110 and summary["plan"]["rows"] == 986, world
        assert summary["plan"]["per_rank_rows"] == -(-986 // world)
    printed = capsys.readouterr().out
    assert "110 held out of the rows (val_size 0.1)" in printed and "at the end" in printed
    with pytest.raises(QvlError, match="eval_steps needs an evaluation set"):
        train(TrainConfig(model="tiny", data=str(demo_build), eval_steps=10, dry_run=True))


# ------------------------------------------------------------------------------------------ loss, accuracy


def _model(dropout: float = 0.1):
    """The tiny model with LoRA (non-zero B) whose lm_head predicts <|im_end|> or "\\n" at many positions
    (a large +/- component along one hidden dimension), so accuracy is neither 0 nor 1 and an off-by-one in the
    shift would show; plain random weights predict no label right."""
    from qvl_train.model import load_model

    torch.manual_seed(0)
    model = load_model(
        TrainConfig(model="tiny", lora_dropout=dropout, gradient_checkpointing=True), CPU, torch.float32
    )
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    head = model.base_model.model.lm_head.weight.data
    head[IM_END, 0] += 5.0
    head[NEWLINE, 0] -= 5.0
    return model


def _reference(model, batches: list[dict], processor) -> tuple[float, int, int]:
    """(loss sum, correct, tokens) from the full logits (every position, attention mask passed): the logits at
    t against the label at t + 1 wherever that label is not -100."""
    loss, correct, tokens = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {
                **to_device(batch, CPU, torch.float32, processor),
                "attention_mask": batch["attention_mask"],
            }
            logits = model(**inputs, use_cache=False).logits
            assert logits.shape[1] == batch["input_ids"].shape[1]  # really every position
            for b in range(logits.shape[0]):
                for t in range(logits.shape[1] - 1):
                    label = int(batch["labels"][b, t + 1])
                    if label == IGNORE_INDEX:
                        continue
                    loss += F.cross_entropy(logits[b, t].double(), torch.tensor(label)).item()
                    correct += int(logits[b, t].argmax()) == label
                    tokens += 1
    return loss, correct, tokens


def test_eval_loss_and_accuracy_equal_a_hand_computation_from_full_logits(demo_build):
    model = _model()
    ds = ShardDataset(demo_build, max_rows=8)
    rows = [ds[i] for i in range(8)]
    batches = [collate(rows[0:2]), collate([rows[6], rows[2]]), collate(rows[3:4]), collate(rows[7:8])]
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding inside a batch
    to_inputs = lambda b: to_device(b, CPU, torch.float32, ds.processor)  # noqa: E731

    result = evaluate(model, batches, Dist(), to_inputs)
    loss, correct, tokens = _reference(model, batches, ds.processor)

    assert tokens == result["eval_tokens"] == sum(b["trained_tokens"] for b in batches) == 197
    assert result["eval_rows"] == 6
    assert 0 < correct < tokens  # the rigged head gets some right, and an off-by-one would change the count
    assert result["eval_accuracy"] == correct / tokens
    assert abs(result["eval_loss"] - loss / tokens) < 1e-5 * (loss / tokens)


def test_evaluate_draws_no_random_numbers_and_restores_each_modules_mode(demo_build):
    model = _model(dropout=0.1)  # in train mode its LoRA dropout would draw from the torch RNG
    model.train()
    visual = model.base_model.model.model.visual
    visual.eval()  # a module that was not training stays that way
    modes = {name: m.training for name, m in model.named_modules()}
    ds = ShardDataset(demo_build, max_rows=4)
    loader = make_eval_loader(ds, 2, Dist())
    to_inputs = lambda b: to_device(b, CPU, torch.float32, ds.processor)  # noqa: E731

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    first = evaluate(model, loader, Dist(), to_inputs)
    second = evaluate(model, loader, Dist(), to_inputs)  # the same batches again: the same numbers

    python_state, numpy_state, torch_state = before
    assert random.getstate() == python_state
    after_numpy = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after_numpy, numpy_state, strict=True))
    assert torch.equal(torch.get_rng_state(), torch_state)
    if torch.cuda.is_available():
        assert all(
            torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_before, strict=True)
        )
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.is_grad_enabled()
    assert first == second and first["eval_rows"] == 4


# ------------------------------------------------------------------------------------------- two ranks


_FORKED: dict = {}  # what the forked ranks inherit from the test instead of rebuilding it


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dist = Dist(rank=rank, world_size=world)
        eval_set = _FORKED["eval_set"]
        result = evaluate(
            _FORKED["model"],
            make_eval_loader(eval_set, 1, dist),  # rank 0: 3 batches, rank 1: 2 (no collective until the end)
            dist,
            lambda b: to_device(b, CPU, torch.float32, eval_set.processor),
        )
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_give_the_numbers_of_one(demo_build, tmp_path):
    _, val_rows = split_rows(demo_build, 5, seed=42, max_rows=16)
    eval_set = ShardDataset(demo_build, rows=val_rows)
    model = _model()
    single = evaluate(
        model,
        make_eval_loader(eval_set, 1, Dist()),
        Dist(),
        lambda b: to_device(b, CPU, torch.float32, eval_set.processor),
    )
    # forked, not spawned: the ranks start with the model and the imports (seconds each on a busy machine)
    _FORKED.update(model=model, eval_set=eval_set)
    try:
        torch.multiprocessing.start_processes(
            _rank_worker,
            args=(2, str(tmp_path / "init"), str(tmp_path / "eval")),
            nprocs=2,
            start_method="fork",
        )
    finally:
        _FORKED.clear()
    ranks = [json.loads((tmp_path / f"eval.{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank holds the reduced numbers
    assert single["eval_rows"] == ranks[0]["eval_rows"] == 5
    assert single["eval_tokens"] == ranks[0]["eval_tokens"]
    assert single["eval_accuracy"] == ranks[0]["eval_accuracy"] > 0  # integer counts: exact
    # the same fp32 row sums added in float64 in another order
    assert abs(single["eval_loss"] - ranks[0]["eval_loss"]) < 1e-12 * single["eval_loss"]


# ------------------------------------------------------------------------------------------ in training

COMMON = dict(
    model="tiny",
    max_steps=4,
    gradient_accumulation_steps=2,
    learning_rate=5e-3,
    logging_steps=1,
    dataloader_num_workers=0,
)  # dropout 0.1 and gradient checkpointing (the defaults) on: any RNG draw by an evaluation would show
TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "trained_tokens", "epoch")
EVAL_KEYS = ("step", "eval_loss", "eval_accuracy", "eval_tokens", "eval_rows")


def _records(log: list[dict]) -> list[tuple]:
    """The log without its timings: training records and eval records, in order."""
    return [tuple(r[k] for k in (EVAL_KEYS if "eval_loss" in r else TRAIN_KEYS)) for r in log]


def test_training_with_evaluation_trains_the_same_adapter_as_without(demo_build, demo_dir, tmp_path):
    from qvl_data.build import BuildConfig, build

    eval_build = tmp_path / "mllm-demo"  # a separate build: the 6 mllm_demo rows
    build(
        BuildConfig(
            dataset_dir=str(demo_dir), dataset="mllm_demo", out=str(eval_build), num_proc=1, quiet=True
        )
    )
    data = dict(data=str(demo_build), max_rows=8, save_steps=0, **COMMON)
    plain = tmp_path / "plain"
    train(TrainConfig(output_dir=str(plain), **data))
    evaluated = tmp_path / "evaluated"
    summary = train(
        TrainConfig(
            output_dir=str(evaluated),
            eval_data=str(eval_build),
            eval_steps=3,
            per_device_eval_batch_size=4,
            **data,
        )
    )

    assert _same_adapter(_adapter(plain), _adapter(evaluated))
    assert any(v.abs().sum() > 0 for k, v in _adapter(plain).items() if "lora_B" in k)  # it did train
    log = _log(evaluated)
    # the training records are those of the run without evaluation
    assert _records([r for r in log if "loss" in r]) == _records(_log(plain))
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 4]  # every 3 steps, and at the end
    assert all(r["eval_rows"] == 6 and r["eval_tokens"] == 245 and "loss" not in r for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # rows share their answers' format: it learns
    assert summary["last_eval"] == evals[-1]
    assert (evaluated / "training_loss.png").is_file()
    assert json.loads((evaluated / "plan.json").read_text())["eval_rows"] == 6


def test_val_split_survives_a_resume_without_relogging_and_refuses_another_split(demo_build, tmp_path):
    data = dict(data=str(demo_build), max_rows=10, val_size=2, eval_steps=1, save_steps=2, log_samples=True)
    straight = tmp_path / "straight"
    train(TrainConfig(output_dir=str(straight), **data, **COMMON))

    # a run that got past step 3 (its eval logged) but died before checkpoint-3 was complete: resume from 2
    resumed = tmp_path / "resumed"
    train(TrainConfig(output_dir=str(resumed), stop_at_step=3, **data, **COMMON))
    assert [r["step"] for r in _log(resumed) if "eval_loss" in r] == [1, 2, 3]
    shutil.rmtree(resumed / "checkpoint-3")
    train(TrainConfig(output_dir=str(resumed), resume="auto", **data, **COMMON))

    assert _same_adapter(_adapter(straight), _adapter(resumed))
    assert _records(_log(resumed)) == _records(_log(straight))  # step 3's eval once, not twice
    assert [r["step"] for r in _log(straight) if "eval_loss" in r] == [1, 2, 3, 4]
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["eval_set"]["val_size"] == 2 and state["eval_set"]["rows"] == 2

    # training rows never include a held-out row, before or after the resume
    train_rows, val_rows = split_rows(demo_build, 2, seed=42, max_rows=10)
    samples = [json.loads(line) for line in (resumed / "samples-rank0.jsonl").read_text().splitlines()]
    assert sorted(s["row"] for s in samples) == train_rows  # 4 steps x 2 micro-batches = one epoch
    assert all(r["eval_rows"] == 2 for r in _log(resumed) if "eval_loss" in r)

    # another split (or none) is another run: refused before anything is written
    before = (resumed / "trainer_log.jsonl").read_bytes()
    for other, said in (
        (dict(val_size=3), "now val_size 3 (3 rows"),
        (dict(val_size=0, eval_steps=0), "now none"),
    ):
        with pytest.raises(QvlError, match=r"evaluation set was val_size 2 \(2 rows") as info:
            train(TrainConfig(output_dir=str(resumed), resume="auto", **{**data, **other}, **COMMON))
        assert said in str(info.value)
    assert (resumed / "trainer_log.jsonl").read_bytes() == before


def test_a_resume_compares_the_evaluation_sets_content_not_its_path(tmp_path):
    from qvl_train.checkpoint import check_resume
    from qvl_train.plan import make_plan

    plan = make_plan(8, 1, 1, 4, 1.0)
    identity = {"val_size": 0.0, "eval_data": "/old/place/eval", "rows": 6, "digest": "ab" * 32}
    state = {
        "world_size": 1,
        "plan": plan.to_dict(),
        "seed": 42,
        "step": 1,
        "data": {"epoch": 0, "batches_done": 4},
    }
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "eval_set": identity}))
    check_resume(checkpoint, plan, TrainConfig(), 1, {**identity, "eval_data": "/new/place/eval"})  # moved
    with pytest.raises(
        QvlError, match=r"was eval_data /old/place/eval \(6 rows, digest abababababab\), now none"
    ):
        check_resume(checkpoint, plan, TrainConfig(), 1)
    with pytest.raises(QvlError, match=r"now eval_data /old/place/eval \(6 rows, digest cdcdcdcdcdcd\)"):
        check_resume(checkpoint, plan, TrainConfig(), 1, {**identity, "digest": "cd" * 32})
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))  # written before evaluation existed
    check_resume(checkpoint, plan, TrainConfig(), 1, {})
    with pytest.raises(QvlError, match=r"evaluation set was none, now eval_data"):
        check_resume(checkpoint, plan, TrainConfig(), 1, identity)
