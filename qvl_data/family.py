"""The Qwen-VL model families: the one place that knows how Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE)
differ. Every other module asks this one (docs/semantics.md, "Model families").

A family is chosen from a checkpoint's ``config.json`` ``model_type`` (or a name such as ``qwen3-vl`` for
the offline default processor, ``tiny-qwen3-vl`` for a test model); ``--template`` (LLaMA-Factory's names)
overrides the family's default template, as in LLaMA-Factory.

Two halves, kept apart so each reads on its own:
- the data side (:class:`Family`): template, tokens, image geometry and processor constants, pre-resize
  defaults, generation stop tokens: what ``qvl_data`` needs to build and inspect shards;
- the model side (:class:`ModelSide`): the modeling classes, LoRA targets, the frozen vision side, rotary
  positions and the tiny test models: what ``qvl_train`` needs to train, generate and export.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl_data.errors import QvlError

# ============================================================================================ data side


@dataclass(frozen=True)
class Family:
    """What a build needs to know about one family (filled by the data-side work of issue 19)."""

    name: str  # qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe
    model_types: tuple[str, ...]  # config.json model_type values it covers
    template: str  # its default LLaMA-Factory template name


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(name="qwen2_5_vl", model_types=("qwen2_5_vl",), template="qwen2_vl"),
}


def family_for_model_type(model_type: str) -> Family:
    """The family of a checkpoint's ``model_type``; one line naming the supported ones otherwise."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise QvlError(f"model_type {model_type!r} is not a supported Qwen-VL family; supported: {supported}")


# =========================================================================================== model side


@dataclass(frozen=True)
class ModelSide:
    """What training, generation and export need to know about one family (filled by the model-side work
    of issue 19)."""

    family: str


MODEL_SIDE: dict[str, ModelSide] = {
    "qwen2_5_vl": ModelSide(family="qwen2_5_vl"),
}


def model_side(family: Family) -> ModelSide:
    return MODEL_SIDE[family.name]
