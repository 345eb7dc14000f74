"""qvl_train.packing: the pack plan, the packed sampler and collate, and that a packed forward/backward
computes each row exactly as the row alone (tiny model, CPU, fp32).

The rows are the first 8 of the demo build: 6 mllm_demo rows (two with two images, four with one) and 2
text-only identity rows, 45 to 195 tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_lora
from safetensors.torch import load_file

from qvl_data.errors import QvlError
from qvl_data.template import IGNORE_INDEX
from qvl_train.config import TrainConfig
from qvl_train.data import ShardDataset, collate
from qvl_train.distributed import Dist
from qvl_train.loop import train
from qvl_train.model import tiny_config
from qvl_train.packing import (
    EMPTY,
    VARLEN,
    PackedBatchSampler,
    PackedCollate,
    PackedDataset,
    attention_kind,
    pack_rows,
    rank_packs,
)
from qvl_train.plan import make_plan
from qvl_train.steps import run_window, to_device

ROOT = Path(__file__).resolve().parent.parent
SEVEN_B = ROOT / "examples" / "configs" / "qwen2_5_vl_7b.json"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows(demo_build) -> list[dict]:
    ds = ShardDataset(demo_build, max_rows=8)
    items = [ds[i] for i in range(8)]
    images = [len(r["image_grid_thw"]) for r in items]
    assert images == [2, 1, 1, 2, 1, 1, 0, 0]  # multi-image, single-image and text-only rows
    return items


@pytest.fixture(scope="module")
def processor(demo_build):
    return ShardDataset(demo_build).processor


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of one row's next-token cross-entropies (its logits and labels, unshifted), in float64."""
    return F.cross_entropy(
        logits[:-1].double(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
    ).item()


def _alone(model, rows: list[dict], processor) -> list[tuple[torch.Tensor, float]]:
    """Each row's logits and loss sum, the row run on its own (the unpacked path)."""
    out = []
    for row in rows:
        batch = collate([row])
        with torch.no_grad():
            logits = model(**to_device(batch, CPU, torch.float32, processor), use_cache=False).logits
        n = len(row["input_ids"])
        out.append((logits[0, :n], _row_loss(logits[0, :n], row["labels"])))
    return out


def _differences(logits: torch.Tensor, batch: dict, alone: list) -> tuple[float, float]:
    """Max abs difference of the per-token logits and of the per-row loss sums, packed vs alone."""
    worst_logit = worst_loss = 0.0
    for (seq, start, end), (ref_logits, ref_loss) in zip(batch["spans"], alone, strict=True):
        row_logits = logits[seq, start:end]
        worst_logit = max(worst_logit, (row_logits - ref_logits).abs().max().item())
        worst_loss = max(worst_loss, abs(_row_loss(row_logits, batch["labels"][seq, start:end]) - ref_loss))
    return worst_logit, worst_loss


# ------------------------------------------------------------------------------------------- the plan


def test_pack_rows_places_every_row_once_within_the_budget():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 300, (500,), generator=generator).tolist()
    packs = pack_rows(lengths, 512, seed=7)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 512 for pack in packs)
    assert len(packs) <= math.ceil(sum(lengths) / 512) * 1.03 + 1  # best fit leaves little room
    assert pack_rows(lengths, 512, seed=7) == packs  # a pure function of lengths, budget and seed
    assert pack_rows(lengths, 512, seed=8) != packs
    assert sorted(map(len, pack_rows([5, 5, 5, 2, 3], 5, seed=0))) == [1, 1, 1, 2]  # full packs close
    with pytest.raises(QvlError, match=r"packing_len 100 is shorter than item 1 \(299 tokens\)"):
        pack_rows([10, 299, 50], 100, seed=0)


def test_packed_dataset_packs_the_datasets_own_rows(demo_build):
    subset = list(range(0, 1096, 7))  # e.g. the training side of a validation split
    ds = ShardDataset(demo_build, rows=subset)
    assert ds.lengths() == [len(ds[i]["input_ids"]) for i in range(len(ds))]  # of the subset's rows
    packed = PackedDataset(ds, packing_len=0, seed=42)
    assert packed.packing_len == ds.manifest.options.cutoff_len == 2048
    seen = [row["row"] for p in range(len(packed)) for row in packed[p]]
    assert sorted(seen) == subset
    assert all(sum(len(r["input_ids"]) for r in packed[p]) <= 2048 for p in range(len(packed)))
    assert packed[EMPTY] == []
    assert PackedDataset(ShardDataset(demo_build, rows=subset), 0, 42).packs == packed.packs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_epoch_trains_every_row_once_on_any_world_size(world):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 700, (301,), generator=generator).tolist()
    packs = pack_rows(lengths, 2048, seed=42)  # takes no world size: the same plan on every rank
    plan = make_plan(len(packs), world, batch_size=2, grad_accum=3, num_train_epochs=2.0)
    orders = []
    for epoch in (0, 1):
        trained, batches = [], []
        for rank in range(world):
            sampler = PackedBatchSampler(len(packs), 2, rank, world, seed=42)
            sampler.set_epoch(epoch)
            mine = list(sampler)
            assert len(mine) == len(sampler) == plan.per_rank_batches  # the plan counts packed sequences
            batches.append(mine)
            trained += [row for batch in mine for p in batch if p != EMPTY for row in packs[p]]
        assert sorted(trained) == list(range(301))  # no row lost, none repeated
        padding = sum(p == EMPTY for mine in batches for batch in mine for p in batch)
        assert padding == math.ceil(len(packs) / world) * world - len(packs)
        orders.append(rank_packs(len(packs), epoch, 42, 0, 1))
    assert orders[0] != orders[1]  # a new seeded order each epoch


def test_packed_sampler_resumes_mid_epoch():
    sampler = PackedBatchSampler(23, 2, rank=1, world_size=3, seed=5)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.set_epoch(1, start_batch=2)
    assert list(sampler) == whole[2:] and len(sampler) == len(whole) - 2


# -------------------------------------------------------------------------------------------- collate


def test_collate_lays_rows_end_to_end_with_their_own_positions(rows):
    collate_fn = PackedCollate(tiny_config(), "sdpa")
    batch = collate_fn([rows[:3], [], rows[6:8]])
    assert batch["input_ids"].shape == (2, 520)  # empty pack dropped; 516 tokens rounded up to 8
    assert batch["input_ids"].shape[1] % 8 == 0
    assert [r[0] for r in batch["rows"]] == [0, 1, 2, 6, 7]
    assert batch["trained_tokens"] == sum(
        int((r["labels"][1:] != IGNORE_INDEX).sum()) for r in rows[:3] + rows[6:]
    )
    text, mrope = batch["position_ids"][0], batch["position_ids"][1:]
    for (seq, start, end), row in zip(batch["spans"], rows[:3] + rows[6:], strict=True):
        assert torch.equal(batch["input_ids"][seq, start:end], row["input_ids"])
        assert batch["labels"][seq, start] == IGNORE_INDEX  # never the target of the previous row
        assert torch.equal(text[seq, start:end], torch.arange(end - start))  # restart per row
        assert mrope[:, seq, start].tolist() == [0, 0, 0]
    # image rows: the image tokens take (t, h, w) positions, so the row's last position is below its length
    seq, start, end = batch["spans"][0]
    assert mrope[:, seq, end - 1].max() < end - start - 1
    # text rows: 1-D positions in all three sections
    seq, start, end = batch["spans"][3]
    assert torch.equal(mrope[:, seq, start:end], torch.arange(end - start).expand(3, -1))
    assert torch.equal(batch["image_grid_thw"], torch.cat([r["image_grid_thw"] for r in rows[:3]]))
    assert batch["pixels"].shape[0] == sum(r["pixels"].shape[0] for r in rows[:3])

    # a row whose first label is trained (no template does this) still never trains across the boundary
    odd = {**rows[7], "labels": rows[7]["input_ids"].clone()}
    both = collate_fn([[rows[6], odd]])
    seq, start, end = both["spans"][1]
    assert both["labels"][seq, start] == IGNORE_INDEX and torch.equal(
        both["labels"][seq, start + 1 : end], odd["labels"][1:]
    )
    assert both["trained_tokens"] == int((rows[6]["labels"][1:] != IGNORE_INDEX).sum()) + end - start - 1

    nothing = collate_fn([[], []])  # a rank's padding: one short sequence of padding, nothing trained
    assert nothing["input_ids"].shape == (1, 8) and nothing["trained_tokens"] == 0 and nothing["rows"] == []


def test_attention_kinds():
    assert attention_kind("flash_attention_2") == VARLEN and attention_kind("flash_attention_3") == VARLEN
    assert attention_kind("sdpa") == "sdpa" and attention_kind("eager") == "eager"
    with pytest.raises(QvlError, match="flex_attention"):
        attention_kind("flex_attention")


# -------------------------------------------------------------------------------- packed = one by one


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_the_rows_one_by_one(rows, processor, attn):
    model = tiny_lora(attn_implementation=attn, gradient_checkpointing=False)
    model.eval()
    alone = _alone(model, rows, processor)
    # two sequences of different lengths (the shorter one padded), rows in a shuffled order
    order = [6, 0, 3, 1, 7, 2, 5, 4]
    batch = PackedCollate(tiny_config(), attn)([[rows[i] for i in order[:5]], [rows[i] for i in order[5:]]])
    inputs = to_device(batch, CPU, torch.float32, processor)
    assert inputs["position_ids"].shape == (4, *batch["input_ids"].shape)
    assert inputs["attention_mask"].dtype == (torch.bool if attn == "sdpa" else torch.float32)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    worst_logit, worst_loss = _differences(logits, batch, [alone[i] for i in order])
    print(f"{attn}: max abs diff, logits {worst_logit:.2e}, row loss sums {worst_loss:.2e}")
    assert worst_logit <= 1e-5 and worst_loss <= 1e-5

    # the test can fail: 1-D positions restarting per row (no (t, h, w) for the image tokens), or no mask
    # (the image row attends to the text row before it). Positions that continue across rows instead of
    # restarting would pass: with the mask, rotary attention sees only position differences within a row.
    small = PackedCollate(tiny_config(), attn)([[rows[6], rows[1]]])
    inputs = to_device(small, CPU, torch.float32, processor)
    flat = inputs["position_ids"][:1].expand(4, -1, -1)
    unmasked = {**inputs, "position_ids": inputs["position_ids"][1:]}  # no text row: no packing detected
    unmasked.pop("attention_mask")
    with torch.no_grad():
        for wrong in ({**inputs, "position_ids": flat}, unmasked):
            logits = model(**wrong, use_cache=False).logits
            assert _differences(logits, small, [alone[6], alone[1]])[0] > 1e-2


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's varlen semantics on the CPU: causal attention within each run of text positions
    that starts at 0, the runs found by transformers' own ``prepare_fa_kwargs_from_position_ids`` (what
    ``_flash_attention_forward`` does with packed position ids). Full attention where not causal (the
    vision tower, which calls it once per image)."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    assert attention_mask is None  # the flash path gets no mask
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    position_ids = kwargs.get("position_ids")
    if not causal or position_ids is None:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, is_causal=causal)
    else:
        assert query.shape[0] == 1  # varlen takes one flattened sequence
        (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        bounds = cu_seqlens.tolist()
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale=scaling, is_causal=True
                )
                for s, e in zip(bounds, bounds[1:], strict=False)
            ],
            dim=2,
        )
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.slow
def test_flash_varlen_layout_gives_the_rows_one_by_one(rows, processor):
    from transformers import AttentionInterface
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    AttentionInterface.register("qvl_varlen_reference", _varlen_reference)
    model = tiny_lora(attn_implementation="qvl_varlen_reference", gradient_checkpointing=False)
    model.eval()
    alone = _alone(model, rows, processor)
    batch = PackedCollate(tiny_config(), "flash_attention_2")([rows[:4], rows[4:]])
    assert batch["input_ids"].shape[0] == 1  # the micro-batch's packs in one sequence
    inputs = to_device(batch, CPU, torch.float32, processor)
    assert "attention_mask" not in inputs
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(inputs["position_ids"][0])
    ends = [end for _, _, end in batch["spans"]]
    assert cu_seqlens.tolist() == [0, *ends, batch["input_ids"].shape[1]]  # rows, then the padding tail
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    worst_logit, worst_loss = _differences(logits, batch, alone)
    print(f"varlen reference: max abs diff, logits {worst_logit:.2e}, row loss sums {worst_loss:.2e}")
    assert worst_logit <= 1e-5 and worst_loss <= 1e-5


def test_packed_lora_gradients_equal_unpacked(rows, processor):
    model = tiny_lora(
        attn_implementation="sdpa", gradient_checkpointing=True
    )  # the trainer's defaults: SDPA, checkpointing
    model.train()

    def window_grads(window: list[dict]) -> tuple[float, int, dict]:
        model.zero_grad(set_to_none=True)
        loss, tokens, _ = run_window(
            model, window, Dist(), lambda b: to_device(b, CPU, torch.float32, processor)
        )
        return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, tokens, unpacked = window_grads([collate([r]) for r in rows])
    packer = PackedCollate(tiny_config(), "sdpa")
    # the same rows as one micro-batch of two packs, and as two micro-batches (one with an empty pack)
    for window in ([packer([rows[:5], rows[5:]])], [packer([rows[5:], rows[:2]]), packer([rows[2:5], []])]):
        packed_loss, packed_tokens, packed = window_grads(window)
        assert packed_tokens == tokens == 295  # all of mllm_demo's trained tokens + identity 0 and 1
        assert abs(packed_loss - loss) <= 1e-6 * loss
        worst = max((packed[n] - g).norm().item() / g.norm().item() for n, g in unpacked.items())
        worst_max = max(
            (packed[n] - g).abs().max().item() / g.abs().max().item() for n, g in unpacked.items()
        )
        print(f"LoRA grads, packed vs unpacked: relative L2 {worst:.2e}, max abs / max {worst_max:.2e}")
        assert all(g.abs().sum() > 0 for g in unpacked.values())
        assert worst <= 1e-6


# ------------------------------------------------------------------------------------------ the trainer


def test_dry_run_counts_packed_sequences(demo_build, capsys):
    cfg = TrainConfig(model=str(SEVEN_B), data=str(demo_build), world_size=2, dry_run=True, packing=True)
    plan = train(cfg)["plan"]
    packs = len(PackedDataset(ShardDataset(demo_build), 0, cfg.seed))
    assert (plan["rows"], plan["packed_rows"], plan["packing_len"]) == (packs, 1096, 2048)
    assert packs <= math.ceil(190_128 / 2048) + 2  # 190,128 tokens in 93 full sequences at best
    assert plan["per_rank_batches"] == math.ceil(packs / 2)
    assert plan["steps_per_epoch"] == math.ceil(plan["per_rank_batches"] / 8)
    assert f"1,096 in {packs} packed sequences of <= 2,048 tokens" in capsys.readouterr().out
    with pytest.raises(QvlError, match=r"packing_len 600 is shorter than row \d+ of .* \(672 tokens\)"):
        train(TrainConfig(**{**cfg.__dict__, "packing_len": 600}))
    with pytest.raises(QvlError, match="flex_attention"):
        train(TrainConfig(**{**cfg.__dict__, "attn_implementation": "flex_attention"}))


def test_packed_training_resumes_exactly(demo_build, tmp_path):
    # 8 rows in 512-token packs (3 packs), 2 epochs of 3 steps; the stop at 4 is mid-epoch; dropout 0.1
    common = dict(
        model="tiny",
        data=str(demo_build),
        max_rows=8,
        packing=True,
        packing_len=512,
        num_train_epochs=2.0,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=0,
        log_samples=True,
    )
    straight = tmp_path / "straight"
    done = train(TrainConfig(output_dir=str(straight), **common))
    assert done["plan"]["rows"] == 3 and done["finished"] and done["step"] == 6
    resumed = tmp_path / "resumed"
    assert train(TrainConfig(output_dir=str(resumed), stop_at_step=4, **common))["step"] == 4
    assert train(TrainConfig(output_dir=str(resumed), resume="auto", **common))["finished"]
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(out: Path, name: str) -> list[dict]:
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    keys = ("step", "loss", "trained_tokens", "grad_norm")
    assert [[r[k] for k in keys] for r in log(straight, "trainer_log.jsonl")] == [
        [r[k] for k in keys] for r in log(resumed, "trainer_log.jsonl")
    ]
    samples = log(straight, "samples-rank0.jsonl")
    assert samples == log(resumed, "samples-rank0.jsonl")
    for epoch in (0, 1):  # each epoch trains each of the 8 rows exactly once
        assert sorted(s["row"] for s in samples if s["epoch"] == epoch) == list(range(8))
