"""qvl_train end to end on CPU with the tiny model: plan, schedule, loss normalisation, exact resume,
a two-process torchrun (gloo) run, and the one-line failures.

The runs train on the first 8 rows of the demo build (6 mllm_demo rows with 1-2 images each, 2 identity
rows; --max-rows 8) so that whole epochs take seconds on one thread; the dry run plans all 1096 rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_lora
from safetensors.torch import load_file

from qvl_train.__main__ import main
from qvl_train.config import TrainConfig
from qvl_train.data import ShardDataset, collate
from qvl_train.distributed import Dist, wrap_ddp
from qvl_train.loop import train
from qvl_train.steps import lr_factor, run_window, to_device, token_loss_sum

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "qwen2_5vl_lora_sft.yaml"
SEVEN_B = ROOT / "examples" / "configs" / "qwen2_5_vl_7b.json"
CPU = torch.device("cpu")
TRAINED_TOKENS_8 = 245 + 25 + 25  # labelled tokens of the first 8 demo rows: all of mllm_demo + identity 0, 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ plan and schedule


def test_cosine_schedule_matches_transformers():
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    for kind, reference in (
        ("cosine", get_cosine_schedule_with_warmup),
        ("linear", get_linear_schedule_with_warmup),
    ):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = reference(optimizer, num_warmup_steps=21, num_training_steps=207)
        for step in range(207):
            assert math.isclose(lr_factor(step, 21, 207, kind), scheduler.get_last_lr()[0], abs_tol=1e-12)
            optimizer.step()
            scheduler.step()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=5)
    assert [lr_factor(s, 5, 20, "constant") for s in range(20)] == [
        scheduler.lr_lambdas[0](s) for s in range(20)
    ]
    assert lr_factor(0, 21, 207) == 0.0 and lr_factor(21, 21, 207) == 1.0 and lr_factor(207, 21, 207) == 0.0


def test_dry_run_plans_the_seed_recipe_on_the_demo_set(demo_build, capsys):
    cfg = TrainConfig(model=str(SEVEN_B), data=str(demo_build), world_size=2, dry_run=True)
    summary = train(cfg)
    plan, params = summary["plan"], summary["params"]
    assert (plan["rows"], plan["per_rank_batches"], plan["steps_per_epoch"]) == (1096, 548, 69)
    assert (plan["total_steps"], plan["warmup_steps"], plan["effective_batch"]) == (207, 21, 16)
    assert (params["trainable"], params["total"]) == (20_185_088, 8_312_351_744)
    printed = capsys.readouterr().out
    for text in ("1,096", "207", "21", "20,185,088", "0.2428%", "8,312,351,744"):
        assert text in printed
    assert not Path(cfg.output_dir).exists()  # a dry run writes nothing


# ------------------------------------------------------------------------------------ loss normalisation


def _window_grads(shards: Path, rows: list[int], batch_size: int, rank: int = 0, world: int = 1):
    """Gradients of the LoRA weights after one accumulation window over ``rows`` (this rank's share)."""
    from qvl_train.model import load_model

    torch.manual_seed(0)
    model = load_model(
        TrainConfig(model="tiny", lora_dropout=0.0, gradient_checkpointing=False), CPU, torch.float32
    )
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without gradient
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    ds = ShardDataset(shards, max_rows=8)
    window = [collate([ds[i] for i in rows[j : j + batch_size]]) for j in range(0, len(rows), batch_size)]
    net = model
    if world > 1:
        net = wrap_ddp(model, Dist(rank=rank, world_size=world))
    loss, tokens, _ = run_window(
        net,
        window,
        Dist(rank=rank, world_size=world),
        lambda b: to_device(b, CPU, torch.float32, ds.processor),
    )
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, loss, tokens


def _grad_worker(rank: int, world: int, init_file: str, shards: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = list(range(8))[rank * 4 : rank * 4 + 4]
        grads, loss, tokens = _window_grads(Path(shards), rows, batch_size=1, rank=rank, world=world)
        torch.save({"grads": grads, "loss": loss, "tokens": tokens}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loss_normalisation_1x8_equals_2_ranks_x4_and_batch_2x4(demo_build, tmp_path):
    single, single_loss, tokens = _window_grads(demo_build, list(range(8)), batch_size=1)
    torch.multiprocessing.spawn(
        _grad_worker, args=(2, str(tmp_path / "init"), str(demo_build), str(tmp_path / "grads")), nprocs=2
    )
    ranks = [torch.load(tmp_path / f"grads.{r}", weights_only=True) for r in range(2)]
    padded, padded_loss, _ = _window_grads(demo_build, list(range(8)), batch_size=2)  # padding within batches

    assert tokens == TRAINED_TOKENS_8
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == tokens
    for name, grad in single.items():
        assert grad.abs().max() > 0
        for rank in ranks:  # after DDP's all-reduce every rank holds the same gradient
            assert (rank["grads"][name] - grad).abs().max().item() < 1e-6, name
        assert (padded[name] - grad).abs().max().item() < 1e-6, name
    assert abs(ranks[0]["loss"] - single_loss) < 1e-6 and abs(padded_loss - single_loss) < 1e-6
    assert 10 < single_loss < 13  # mean token loss of a random model over a ~152k vocabulary (ln = 11.9)


def _image_and_text_rows(shards: Path) -> tuple[dict, dict]:
    ds = ShardDataset(shards, max_rows=8)
    rows = [ds[i] for i in range(8)]
    return next(r for r in rows if r["pixels"] is not None), next(r for r in rows if r["pixels"] is None)


def test_token_loss_sum_equals_the_models_own_loss_from_full_logits(demo_build):
    # An independent reference: transformers' own shifted cross-entropy over the full logits (labels=),
    # which is a mean over the trained tokens. Catches an off-by-one in logits_to_keep or in the targets.
    model = tiny_lora(gradient_checkpointing=False)
    model.eval()
    image_row, text_row = _image_and_text_rows(demo_build)
    processor = ShardDataset(demo_build).processor
    for rows in ([image_row], [text_row], [image_row, text_row], [text_row, image_row]):
        batch = collate(rows)
        inputs = to_device(batch, CPU, torch.float32, processor)
        with torch.no_grad():
            ours = token_loss_sum(model, inputs, batch["labels"])
            full = model(
                **{**inputs, "attention_mask": batch["attention_mask"]},
                labels=batch["labels"],
                use_cache=False,
            )
        assert full.logits.shape[1] == batch["input_ids"].shape[1]  # the reference saw every position
        reference = full.loss.double() * batch["trained_tokens"]
        assert abs(ours.item() - reference.item()) < 1e-5 * reference.item(), (len(rows), ours, reference)


def test_a_long_micro_batch_computes_its_loss_in_chunks_with_the_same_loss_and_grads(demo_build, monkeypatch):
    # A packed sequence keeps ~1,600 positions, whose logits alone are ~1 GB: above CHUNKED_LOSS_ABOVE kept
    # positions the loss runs LOSS_CHUNK positions at a time. Forced here on a small batch.
    import qvl_train.steps as steps

    model = tiny_lora(gradient_checkpointing=True)
    model.train()
    image_row, text_row = _image_and_text_rows(demo_build)
    batch = collate([image_row, text_row])
    inputs = to_device(batch, CPU, torch.float32, ShardDataset(demo_build).processor)

    def loss_and_grads() -> tuple[float, dict]:
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, inputs, batch["labels"])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = loss_and_grads()
    calls = []
    real_chunk = steps._chunk_loss_sum
    monkeypatch.setattr(steps, "_chunk_loss_sum", lambda *a: calls.append(a[1].shape[0]) or real_chunk(*a))
    monkeypatch.setattr(steps, "CHUNKED_LOSS_ABOVE", 8)
    monkeypatch.setattr(steps, "LOSS_CHUNK", 16)
    chunked, chunked_grads = loss_and_grads()
    kept = batch["labels"].shape[0] * int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    assert sum(calls) >= kept and max(calls) == 16  # really chunked (the backward recomputes each chunk)
    assert abs(chunked - whole) < 1e-6 * whole
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
    assert type(steps._output_embeddings(model)).__name__ == "Linear"  # the lm_head is back in place


def test_right_padded_batches_train_without_a_mask_with_identical_loss_and_grads(demo_build):
    # The mask made transformers build a 4-D mask (no flash SDPA kernel); for right padding it changes nothing.
    model = tiny_lora(gradient_checkpointing=True)
    model.train()
    image_row, text_row = _image_and_text_rows(demo_build)
    batch = collate([image_row, text_row])
    assert (batch["attention_mask"] == 0).any()  # really padded
    inputs = to_device(batch, CPU, torch.float32, ShardDataset(demo_build).processor)
    assert "attention_mask" not in inputs

    def loss_and_grads(kwargs: dict) -> tuple[float, dict]:
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, kwargs, batch["labels"])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(inputs)
    masked_loss, masked_grads = loss_and_grads({**inputs, "attention_mask": batch["attention_mask"]})
    assert abs(loss - masked_loss) < 1e-6 * loss
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        # equal up to float rounding: the masked and the causal SDPA paths sum in a different order
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-5, atol=1e-6 * grad.abs().max().item())

    # a mask that is not plain right padding still goes to the model
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert "attention_mask" in to_device(left, CPU, torch.float32, ShardDataset(demo_build).processor)


def test_token_loss_sum_finds_kept_positions_on_the_cpu():
    # Device labels would need nonzero() there (a host sync per micro-batch). Here the "device" is meta: it
    # holds no data, so any data-dependent op on it fails; the kept positions must come from the CPU labels.
    seen = {}

    def model(input_ids, logits_to_keep, use_cache):
        seen["keep"] = logits_to_keep
        return type(
            "Out", (), {"logits": torch.zeros(input_ids.shape[0], len(logits_to_keep), 11, device="meta")}
        )

    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, -100, -100, 5, 6, -100]])
    loss = token_loss_sum(model, {"input_ids": torch.zeros(2, 6, dtype=torch.long, device="meta")}, labels)
    assert loss.device.type == "meta" and seen["keep"].device.type == "meta" and seen["keep"].shape == (3,)
    with pytest.raises(ValueError, match="CPU labels"):
        token_loss_sum(model, {"input_ids": labels.to("meta")}, labels.to("meta"))


def test_ddp_broadcasts_only_the_trainable_weights(tmp_path, monkeypatch):
    import torch.distributed as torch_dist
    import torch.distributed.utils as dist_utils

    model = tiny_lora(gradient_checkpointing=False)
    broadcast: list[torch.Tensor] = []
    real = dist_utils._sync_params_and_buffers
    monkeypatch.setattr(
        dist_utils,
        "_sync_params_and_buffers",
        lambda pg, states, *a: (broadcast.extend(states), real(pg, states, *a)),
    )
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrap_ddp(model, Dist())
    finally:
        torch_dist.destroy_process_group()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in broadcast) == trainable == 32_768  # not the 39 M frozen weights


# ------------------------------------------------------------------------------------------ exact resume


def test_resume_is_exact(demo_build, tmp_path):
    # 8 rows, accumulation 2 -> 4 steps per epoch; 6 steps cross an epoch; the stop at 3 is mid-epoch and
    # mid logging interval; dropout 0.1 and gradient checkpointing on, so RNG restore matters.
    common = dict(
        model="tiny",
        data=str(demo_build),
        max_rows=8,
        max_steps=6,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=2,
        save_steps=0,
        dataloader_num_workers=0,
    )
    straight = tmp_path / "straight"
    train(TrainConfig(output_dir=str(straight), **common))
    resumed = tmp_path / "resumed"
    first = train(TrainConfig(output_dir=str(resumed), stop_at_step=3, **common))
    assert first["step"] == 3 and not first["finished"]
    assert not (resumed / "adapter_model.safetensors").exists() and (resumed / "checkpoint-3").is_dir()
    state = json.loads((resumed / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["data"] == {"epoch": 0, "batches_done": 6} and state["pending"]["steps"] == 1
    second = train(TrainConfig(output_dir=str(resumed), resume="auto", **common))
    assert second["finished"] and second["step"] == 6

    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    keys = ("step", "loss", "lr", "grad_norm", "trained_tokens", "epoch")
    assert [[r[k] for k in keys] for r in _log(straight)] == [[r[k] for k in keys] for r in _log(resumed)]
    assert [r["step"] for r in _log(resumed)] == [2, 4, 6]
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # optimizer, scheduler and RNG states load without arbitrary pickle
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(resumed / "checkpoint-6" / name, weights_only=True)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_refused_resume_changes_nothing_in_the_output_dir(demo_build, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", "tiny", "--data", str(demo_build), "--max-rows", "8", "--output-dir", str(out)]
    common += ["--gradient-accumulation-steps", "4", "--save-steps", "0", "--dataloader-num-workers", "0"]
    main([*common, "--max-steps", "2", "--stop-at-step", "1"])
    before = _snapshot(out)
    assert "plan.json" in before and "checkpoint-1/trainer_state.json" in before
    capsys.readouterr()
    assert "total_steps was 2, now 3" in _fails([*common, "--max-steps", "3", "--resume", "auto"], capsys)
    assert "seed was 42, now 7" in _fails(
        [*common, "--max-steps", "2", "--seed", "7", "--resume", "auto"], capsys
    )
    assert _snapshot(out) == before  # plan.json included


def test_resume_with_another_world_size_says_rank_in_the_singular(tmp_path):
    from qvl_data.errors import QvlError
    from qvl_train.checkpoint import check_resume
    from qvl_train.plan import make_plan

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    plan = make_plan(8, 2, 1, 4, 1.0)
    state = {
        "world_size": 1,
        "plan": plan.to_dict(),
        "seed": 42,
        "step": 1,
        "data": {"epoch": 0, "batches_done": 4},
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(QvlError, match=r"saved by 1 rank, resumed with 2;"):
        check_resume(checkpoint, plan, TrainConfig(), world_size=2)


def test_resume_refuses_a_packing_change_even_with_equal_counts(tmp_path):
    """Packed and unpacked plans can agree on every count; the checkpoint still belongs to the other run."""
    from qvl_data.errors import QvlError
    from qvl_train.checkpoint import check_resume
    from qvl_train.plan import make_plan

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    packed = make_plan(8, 1, 1, 4, 1.0, packing_len=2048, packed_rows=20)
    state = {
        "world_size": 1,
        "plan": packed.to_dict(),
        "seed": 42,
        "step": 1,
        "data": {"epoch": 0, "batches_done": 4},
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    check_resume(checkpoint, packed, TrainConfig(), world_size=1)  # the same run resumes
    with pytest.raises(QvlError, match=r"packing_len was 2048, now 0"):
        check_resume(checkpoint, make_plan(8, 1, 1, 4, 1.0), TrainConfig(), world_size=1)


# --------------------------------------------------------------------------------- torchrun, two ranks


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft vs transformers 5
def test_torchrun_two_ranks_split_the_epoch_and_overfit(demo_build, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "qvl_train",
        "--model",
        "tiny",
        "--data",
        str(demo_build),
        "--max-rows",
        "8",
        "--output-dir",
        str(out),
        "--num-train-epochs",
        "4",
        "--gradient-accumulation-steps",
        "2",
        "--learning-rate",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--logging-steps",
        "1",
        "--save-steps",
        "4",
        "--save-total-limit",
        "1",
        "--log-samples",
        "--dataloader-num-workers",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    # the two ranks saw disjoint rows that cover each epoch
    samples = [
        json.loads(line) for r in (0, 1) for line in (out / f"samples-rank{r}.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 4 * 8
    for epoch in range(4):
        per_rank = [[s["row"] for s in samples if s["epoch"] == epoch and s["rank"] == r] for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 4
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(8))
    assert sorted({(s["source"], s["index"]) for s in samples}) == [("identity", 0), ("identity", 1)] + [
        ("mllm_demo", i) for i in range(6)
    ]

    # finite logged loss that falls when overfitting the 8 rows
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    losses = [r["loss"] for r in log]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3 and losses[-1] < losses[0] - 0.3, losses
    assert all(r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and "eta_s" in r for r in log)
    assert (
        log[0]["trained_tokens"] + log[1]["trained_tokens"] == TRAINED_TOKENS_8
    )  # an epoch: each token once

    # output dir: adapter loadable with PEFT, plan, log, plot; pruned checkpoints with every rank's RNG
    for name in ("adapter_config.json", "adapter_model.safetensors", "plan.json", "training_loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "plan.json").read_text())["plan"]["total_steps"] == 8
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-8"]  # checkpoint-4 pruned (limit 1)
    assert {p.name for p in (out / "checkpoint-8").iterdir()} >= {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
        "rng_state_1.pt",
        "trainer_state.json",
    }
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qvl_train.model import tiny_model_dir

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir())
    model = PeftModel.from_pretrained(base, out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = dict(model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), value), key
    assert not any("visual" in key for key in saved)


# ------------------------------------------------------------------------------------------- failures


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_clear_failures(demo_build, tmp_path, capsys):
    data = ["--model", "tiny", "--data", str(demo_build)]
    assert "no such shard directory" in _fails(["--data", str(tmp_path / "none"), "--dry-run"], capsys)
    (tmp_path / "half").mkdir()
    assert "manifest.json: missing" in _fails(["--data", str(tmp_path / "half"), "--dry-run"], capsys)

    small = tmp_path / "small.json"
    config = json.loads(SEVEN_B.read_text())
    small.write_text(json.dumps({**config, "vocab_size": 32000}))
    assert "embedding has 32000 rows" in _fails(
        ["--data", str(demo_build), "--model", str(small), "--dry-run"], capsys
    )
    small.write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    assert "qwen2_vl" in _fails(["--data", str(demo_build), "--model", str(small), "--dry-run"], capsys)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "trainer_log.jsonl").write_text("")
    assert "not empty" in _fails([*data, "--output-dir", str(busy)], capsys)
    assert "not a complete checkpoint" in _fails(
        [*data, "--output-dir", str(busy), "--resume", str(busy)], capsys
    )
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _fails([*data, "--device", "cuda", "--dry-run"], capsys)
    assert "holds no weights" in _fails(
        ["--data", str(demo_build), "--model", str(SEVEN_B), "--output-dir", str(tmp_path / "w")], capsys
    )
