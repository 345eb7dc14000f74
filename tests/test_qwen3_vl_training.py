"""Qwen3-VL (dense and MoE) on the training side: the tiny random models train on real Qwen3-VL shards
(``qvl-data build --model qwen3-vl``), packed rows equal the rows one by one with Qwen3-VL's own rotary
positions, LoRA reaches the language model only (the vision tower, deepstack mergers included, runs no
backward), the real configs' dry-run counts equal peft's, and an unsupported model_type is one line."""

from __future__ import annotations

import json
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
from qvl_train.loop import train
from qvl_train.model import (
    TINY_QWEN3_VL,
    TINY_QWEN3_VL_MOE,
    check_compatible,
    meta_model,
    model_config,
    param_report,
)
from qvl_train.packing import PackedCollate
from qvl_train.steps import to_device

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
CPU = torch.device("cpu")
TINIES = [TINY_QWEN3_VL, TINY_QWEN3_VL_MOE]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows(qwen3_build) -> list[dict]:
    ds = ShardDataset(qwen3_build, max_rows=8)
    assert ds.manifest.family == "qwen3_vl" and ds.processor.patch_size == 16
    items = [ds[i] for i in range(len(ds))]
    assert any(len(r["image_grid_thw"]) for r in items) and any(not len(r["image_grid_thw"]) for r in items)
    return items


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(
        logits[:-1].double(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
    ).item()


@pytest.mark.parametrize("name", TINIES)
def test_lora_targets_the_language_model_only_and_the_vision_side_runs_no_backward(name, rows, qwen3_build):
    model = tiny_lora(name)
    lora = [k for k, p in model.named_parameters() if p.requires_grad]
    assert lora and all(".language_model.layers." in k and "lora_" in k for k in lora)
    assert not any("visual" in k or "deepstack" in k or "experts" in k for k in lora)
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora}
    if name == TINY_QWEN3_VL_MOE:  # fused 3-D experts and a plain-weight router: attention only
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    else:
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    visual = model.get_base_model().model.visual
    assert len(visual.deepstack_merger_list) == 2
    backward_calls = []
    for module in (visual.blocks[0], visual.deepstack_merger_list[0], visual.merger):
        module.register_full_backward_hook(lambda *args: backward_calls.append(args))
    processor = ShardDataset(qwen3_build).processor
    image_row = next(r for r in rows if len(r["image_grid_thw"]))
    inputs = to_device(collate([image_row]), CPU, torch.float32, processor)
    logits = model(**inputs, use_cache=False).logits
    loss = _row_loss(logits[0], image_row["labels"])
    F.cross_entropy(logits[0, :-1], image_row["labels"][1:], ignore_index=IGNORE_INDEX).backward()
    assert loss > 0 and backward_calls == []
    assert all(p.grad is None for p in visual.parameters())
    assert all(model.get_parameter(k).grad is not None for k in lora)


@pytest.mark.parametrize("name", TINIES)
def test_packed_rows_equal_the_rows_one_by_one(name, rows, qwen3_build):
    model = tiny_lora(name).eval()
    processor = ShardDataset(qwen3_build).processor
    alone = []
    for row in rows:
        with torch.no_grad():
            logits = model(**to_device(collate([row]), CPU, torch.float32, processor), use_cache=False).logits
        n = len(row["input_ids"])
        alone.append((logits[0, :n], _row_loss(logits[0, :n], row["labels"])))
    order = list(range(len(rows)))[::-1]
    half = len(order) // 2
    collate_packs = PackedCollate(model_config(name), "sdpa")
    batch = collate_packs([[rows[i] for i in order[:half]], [rows[i] for i in order[half:]]])
    with torch.no_grad():
        logits = model(**to_device(batch, CPU, torch.float32, processor), use_cache=False).logits
    worst_logit = worst_loss = 0.0
    for (seq, start, end), i in zip(batch["spans"], order, strict=True):
        worst_logit = max(worst_logit, (logits[seq, start:end] - alone[i][0]).abs().max().item())
        worst_loss = max(worst_loss, abs(_row_loss(logits[seq, start:end], rows[i]["labels"]) - alone[i][1]))
    assert worst_logit <= 1e-5 and worst_loss <= 1e-5
    # the test can fail: 1-D positions (no (t, h, w) for the image tokens) change the image rows
    flat = {**to_device(batch, CPU, torch.float32, processor)}
    flat["position_ids"] = flat["position_ids"][:1].expand(4, -1, -1)
    with torch.no_grad():
        wrong = model(**flat, use_cache=False).logits
    image = next(k for k, i in enumerate(order) if len(rows[i]["image_grid_thw"]))
    seq, start, end = batch["spans"][image]
    assert (wrong[seq, start:end] - alone[order[image]][0]).abs().max().item() > 1e-3


@pytest.mark.parametrize(("name", "packing"), [(n, p) for n in TINIES for p in (False, True)])
def test_training_resumes_exactly(name, packing, qwen3_build, tmp_path):
    common = dict(
        model=name,
        packing=packing,
        data=str(qwen3_build),
        max_rows=6,
        per_device_train_batch_size=2,
        max_steps=3,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=0,
    )
    straight = tmp_path / "straight"
    done = train(TrainConfig(output_dir=str(straight), **common))
    assert done["finished"] and done["step"] == 3
    resumed = tmp_path / "resumed"
    assert train(TrainConfig(output_dir=str(resumed), stop_at_step=2, **common))["step"] == 2
    assert train(TrainConfig(output_dir=str(resumed), resume="auto", **common))["finished"]
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in (straight / "trainer_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


@pytest.mark.parametrize(
    ("config", "total"), [("qwen3_vl_8b.json", 8_767_123_696), ("qwen3_vl_30b_a3b.json", 31_070_754_032)]
)
def test_dry_run_prints_the_real_configs_trainable_counts_equal_to_peft(config, total, qwen3_build, capsys):
    path = str(CONFIGS / config)
    cfg = TrainConfig(model=path, data=str(qwen3_build), dry_run=True)
    model = meta_model(cfg, model_config(path))
    trainable, peft_total = model.get_nb_trainable_parameters()
    report = param_report(model)
    assert report["trainable"] == trainable and report["total"] == peft_total == total + trainable
    train(cfg)
    assert f"{trainable:,}" in capsys.readouterr().out


def test_qwen3_vl_shards_refuse_a_qwen2_5_vl_model_and_back(qwen3_build, demo_build):
    qwen3 = ShardDataset(qwen3_build)
    with pytest.raises(QvlError, match="built for qwen3_vl"):
        check_compatible(model_config("tiny"), qwen3.processor, "tiny", qwen3.manifest.family)
    qwen25 = ShardDataset(demo_build)
    with pytest.raises(QvlError):
        check_compatible(model_config(TINY_QWEN3_VL), qwen25.processor, TINY_QWEN3_VL, qwen25.manifest.family)
    check_compatible(
        model_config(TINY_QWEN3_VL_MOE), qwen3.processor, TINY_QWEN3_VL_MOE, qwen3.manifest.family
    )


def test_an_unsupported_model_type_stops_with_one_line_naming_it_and_the_supported_ones(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    for name in (str(config), str(tmp_path)):
        with pytest.raises(QvlError) as info:
            model_config(name)
        message = str(info.value)
        assert "\n" not in message and "'llava'" in message
        assert all(t in message for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"))
