"""bench/gpu_step.py pieces that the CPU can check (the GPU run itself needs a GPU): the peak FLOP/s table,
the checkpointing configurations and the switch between them."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_step


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),  # must not take the SXM H200's peak
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA A100-SXM4-80GB", 312),
    ],
)
def test_peak_flops_by_card_name(name, tflops):
    assert gpu_step.peak_flops(name, None) == tflops * 1e12


def test_checkpointing_configurations_default_to_on_and_off():
    assert gpu_step.parse_args([]).checkpointing == [True, False]
    assert gpu_step.parse_args(["--checkpointing", "off"]).checkpointing == [False]
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--checkpointing", "sometimes"])


def test_set_checkpointing_toggles_without_input_grad_hooks():
    from qvl_train.model import tiny_config

    torch.manual_seed(0)
    model, _, _ = gpu_step.build_model(tiny_config(), torch.device("cpu"), torch.float32)
    language_model = model.get_base_model().model.language_model

    def hooks() -> int:
        return sum(
            getattr(h, "__name__", "").startswith("make_inputs_require_grad")
            for m in model.modules()
            for h in m._forward_hooks.values()
        )

    assert language_model.gradient_checkpointing and hooks() == 0
    gpu_step.set_checkpointing(model, False)
    assert not language_model.gradient_checkpointing and hooks() == 0
    gpu_step.set_checkpointing(model, True)
    assert language_model.gradient_checkpointing and hooks() == 0
