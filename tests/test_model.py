"""qvl_train.model: LoRA only on the language model, fp32 trainable weights, the 7B meta-device count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import processor_summary

from qvl_data.errors import QvlError
from qvl_train.config import TrainConfig
from qvl_train.data import collate
from qvl_train.model import (
    check_compatible,
    load_model,
    lora_target_regex,
    meta_model,
    model_config,
    param_report,
    tiny_config,
)
from qvl_train.steps import token_loss_sum

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEVEN_B = EXAMPLES / "configs" / "qwen2_5_vl_7b.json"
PROCESSOR_SUMMARY = processor_summary()  # what a build of the demo records


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROCESSOR = processor_summary(image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _image_row() -> dict:
    """One chat row with a 4x4-patch image (4 image tokens) and a 4-token trained answer."""
    g = torch.Generator().manual_seed(0)
    ids = [151644, 872, 198, 151652, *[151655] * 4, 151653, 151645, 198, 151644, 77091, 198, 9707, 13, 151645]
    return {
        "row": 0,
        "source": "t",
        "index": 0,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor([-100] * 13 + ids[13:]),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixels": torch.randint(0, 256, (16, 588), dtype=torch.uint8, generator=g),
    }


def test_target_regex_matches_language_model_linears_only():
    regex = lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for name in (
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.27.mlp.down_proj",
    ):
        assert re.fullmatch(regex, name)
    for name in (
        "model.visual.blocks.0.mlp.gate_proj",
        "model.visual.blocks.3.mlp.up_proj",
        "model.visual.blocks.0.attn.qkv",
        "model.visual.merger.mlp.0",
        "lm_head",
        "model.language_model.embed_tokens",
        "model.language_model.layers.0.self_attn",
    ):
        assert not re.fullmatch(regex, name)
    assert not re.fullmatch(
        lora_target_regex(["q_proj", "v_proj"]), "model.language_model.layers.0.self_attn.k_proj"
    )


def test_seven_b_meta_dry_run_counts():
    config = model_config(str(SEVEN_B))
    assert config.text_config.hidden_size == 3584 and config.vision_config.hidden_size == 1280
    check_compatible(config, PROCESSOR_SUMMARY)
    model = meta_model(TrainConfig(), config)
    report = param_report(model)
    assert (
        report["trainable"]
        == 20_185_088
        == 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    )
    assert report["total"] == 8_312_351_744 and report["base"] == 8_292_166_656
    assert f"{report['percent']:.4f}" == "0.2428"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 196 and not any("visual" in n for n in trainable)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_model_trainable_parameters_and_gradients():
    model = load_model(TrainConfig(model="tiny"), torch.device("cpu"), torch.float32)
    report = param_report(model)
    assert 39_000_000 < report["total"] < 40_000_000
    assert report["trainable"] == 2 * 8 * (2 * (128 + 128) + 2 * (128 + 64) + 3 * (128 + 256)) == 32_768
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 7
    assert all(re.search(r"language_model\.layers\.\d+\..*\.lora_[AB]\.", n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 14 and not any("visual" in n for n in wrapped)
    assert model.base_model.model.model.language_model.gradient_checkpointing

    # one image + text batch: every LoRA weight receives a gradient (B starts at zero: perturb it first)
    for name, param in trainable.items():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    row = _image_row()
    from qvl_train.steps import to_device

    inputs = to_device(collate([row]), torch.device("cpu"), torch.float32, PROCESSOR)
    model.train()
    loss = token_loss_sum(model, inputs, collate([row])["labels"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_frozen_vision_tower_runs_no_backward():
    # Input-embedding hooks (transformers' checkpointing, peft) made patch_embed's output require grad, so
    # the frozen vision blocks joined the autograd graph: recomputed and back-propagated for nothing.
    from qvl_train.steps import to_device

    torch.manual_seed(0)
    model = load_model(TrainConfig(model="tiny", lora_dropout=0.0), torch.device("cpu"), torch.float32)
    assert model.base_model.model.model.language_model.gradient_checkpointing
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    in_graph: list[bool] = []  # per vision block call: does its output carry an autograd graph?
    for block in model.base_model.model.model.visual.blocks:
        block.register_forward_hook(lambda m, i, out: in_graph.append(bool(out.requires_grad)))
    batch = collate([_image_row()])
    inputs = to_device(batch, torch.device("cpu"), torch.float32, PROCESSOR)
    model.train()

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        token_loss_sum(model, inputs, batch["labels"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    grads = lora_grads()
    assert len(in_graph) == 2 and not any(in_graph)  # 2 blocks ran forward, none in the backward graph
    assert all(g.abs().sum() > 0 for g in grads.values())

    # the old behaviour, for comparison: the hooks put the vision blocks in the graph; same LoRA gradients
    model.base_model.model.enable_input_require_grads()
    in_graph.clear()
    hooked = lora_grads()
    assert in_graph and all(in_graph)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hooked[name], rtol=1e-5, atol=1e-7)


def test_flash_attention_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    from qvl_train.model import check_attn_implementation

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name)
    )
    with pytest.raises(QvlError, match="flash_attention_2 needs the flash-attn package") as info:
        load_model(
            TrainConfig(model="tiny", attn_implementation="flash_attention_2"),
            torch.device("cpu"),
            torch.float32,
        )
    assert "\n" not in str(info.value)
    check_attn_implementation("sdpa")  # the default needs nothing


def test_incompatible_models_are_refused(tmp_path):
    check_compatible(tiny_config(), PROCESSOR_SUMMARY, "tiny")
    with pytest.raises(QvlError, match="160000-token"):
        check_compatible(tiny_config(), processor_summary(vocab_size=160000))
    with pytest.raises(QvlError, match="patch"):
        check_compatible(tiny_config(), processor_summary(patch_size=16))
    config = tiny_config()
    config.image_token_id = 5
    with pytest.raises(QvlError, match="image_token_id"):
        check_compatible(config, PROCESSOR_SUMMARY)
    llama = tmp_path / "config.json"
    llama.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    with pytest.raises(QvlError, match="model_type 'llama'"):
        model_config(str(llama))
    with pytest.raises(QvlError, match="no such model directory"):
        model_config(str(tmp_path / "missing"))
