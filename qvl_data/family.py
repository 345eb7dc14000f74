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

from dataclasses import dataclass, field

from qvl_data.errors import QvlError
from qvl_data.format import PatchGeometry

# ============================================================================================ data side

# Token ids shared by every family (the Qwen2 vocabulary; docs/semantics.md section 6).
PAD_ID = 151643  # <|endoftext|>
IM_END_ID = 151645  # <|im_end|>: the templates' stop word and the tokenizer's eos

#: Thought words of LF's templates (``Template.thought_words``): a reasoning template's empty think is
#: ``THOUGHT_WORDS[0] + THOUGHT_WORDS[1]`` = ``<think>\n\n</think>\n\n``.
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")


@dataclass(frozen=True)
class ChatTemplate:
    """One LLaMA-Factory 0.9.5 chat template (``register_template`` in its ``data/template.py``): the slot
    strings (``{content}`` is the text), the default system prompt ("" for none) and whether it is a
    ``ReasoningTemplate`` (think blocks, see qvl_data/template.py and docs/semantics.md "Model families")."""

    name: str
    system_format: str = "<|im_start|>system\n{content}<|im_end|>\n"
    user_format: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assistant_format: str = "{content}<|im_end|>\n"
    default_system: str = ""
    reasoning: bool = False
    thought_words: tuple[str, str] = THOUGHT_WORDS
    stop_words: tuple[str, ...] = ("<|im_end|>",)


#: The templates qvl implements, by LLaMA-Factory's names (``--template``).
TEMPLATES: dict[str, ChatTemplate] = {
    "qwen2_vl": ChatTemplate(name="qwen2_vl", default_system="You are a helpful assistant."),
    "qwen3_vl": ChatTemplate(name="qwen3_vl", reasoning=True),
    "qwen3_vl_nothink": ChatTemplate(name="qwen3_vl_nothink"),
}


def chat_template(name: str) -> ChatTemplate:
    """The template named ``name``; one line naming the supported ones otherwise."""
    if name not in TEMPLATES:
        raise QvlError(f"--template {name!r} is not supported; supported: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# Added tokens of the Qwen2-VL / Qwen2.5-VL tokenizers, in id order from 151643: (content, special).
_QWEN2_ADDED = (
    *((t, True) for t in (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    )),
    *((t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>",
    )),
)  # fmt: skip
# Qwen3(-VL) appends four more, all special: false (tests/fixtures/lf095/README.md, "Tokenizer").
_QWEN3_ADDED = (
    *_QWEN2_ADDED,
    *((t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")),
)


def _numbered(tokens: tuple[tuple[str, bool], ...]) -> tuple[tuple[int, str, bool], ...]:
    return tuple((PAD_ID + i, content, special) for i, (content, special) in enumerate(tokens))


#: Added tokens that are content, never control tokens: LLaMA-Factory keeps them as text in answers (think
#: blocks, tool calls and responses), so a row may contain them (docs/semantics.md "Model families").
CONTENT_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")

# Image-processor constants (preprocessor_config.json of the released checkpoints; docs/semantics.md).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Family:
    """What a build needs to know about one family: its template, tokens, image geometry and processor
    constants, pre-resize defaults and generation stop tokens (docs/semantics.md "Model families")."""

    name: str  # qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe
    model_types: tuple[str, ...]  # config.json model_type values it covers
    template: str  # its default LLaMA-Factory template name
    offline_name: str  # --model NAME selecting its offline default processor (qwen3-vl, ...)
    processor_key: str  # the embedded processor it shares (qwen3_vl_moe uses qwen3_vl's)
    processor_class: str  # preprocessor_config.json's processor_class
    added_tokens: tuple[tuple[int, str, bool], ...]  # (id, content, special), from 151643
    model_max_length: int  # tokenizer_config.json
    patch_size: int  # pixels per patch side
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int  # the image processor's smart_resize bounds (size.shortest_edge / longest_edge)
    max_pixels: int
    temporal_patch_size: int = 2
    merge_size: int = 2
    # pre-resize defaults (LLaMA-Factory's image_max_pixels / image_min_pixels; qvl's is the reference
    # yaml's 512*512, the same for every family)
    image_max_pixels: int = 262144
    image_min_pixels: int = 1024
    #: what generation stops at: <|im_end|> (the template's stop word) and <|endoftext|>
    #: (generation_config.json eos_token_id of the released Instruct checkpoints)
    stop_token_ids: tuple[int, ...] = (IM_END_ID, PAD_ID)
    eos_token_id: int = IM_END_ID
    pad_token_id: int = PAD_ID
    content_tokens: tuple[str, ...] = field(default=CONTENT_TOKENS)

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """Added tokens a row's text may not contain (the tokenizer would read them as the token itself)."""
        return tuple(c for _, c, _ in self.added_tokens if c not in self.content_tokens)

    @property
    def factor(self) -> int:
        """smart_resize's factor: image sides are multiples of it (28 or 32 px)."""
        return self.patch_size * self.merge_size

    @property
    def geometry(self) -> PatchGeometry:
        """Its patch geometry: values per stored patch (``geometry.values_per_patch``: uint8/webp one temporal
        copy, 588 or 768; float32 1176 or 1536). Image tokens per image: ``vision.image_token_count``."""
        return PatchGeometry(self.patch_size, self.temporal_patch_size, self.merge_size)


_QWEN2 = dict(
    added_tokens=_numbered(_QWEN2_ADDED),
    patch_size=14,
    image_mean=_CLIP_MEAN,
    image_std=_CLIP_STD,
    min_pixels=3136,
    max_pixels=12845056,
)
_QWEN3 = dict(
    template="qwen3_vl",
    offline_name="qwen3-vl",
    processor_key="qwen3_vl",
    processor_class="Qwen3VLProcessor",
    added_tokens=_numbered(_QWEN3_ADDED),
    model_max_length=262144,
    patch_size=16,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=65536,
    max_pixels=16777216,
)

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        template="qwen2_vl",
        offline_name="qwen2-vl",
        processor_key="qwen2_vl",
        processor_class="Qwen2VLProcessor",
        model_max_length=32768,
        **_QWEN2,
    ),
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        template="qwen2_vl",
        offline_name="qwen2.5-vl",
        processor_key="qwen2_5_vl",
        processor_class="Qwen2_5_VLProcessor",
        model_max_length=131072,
        **_QWEN2,
    ),
    "qwen3_vl": Family(name="qwen3_vl", model_types=("qwen3_vl",), **_QWEN3),
    "qwen3_vl_moe": Family(
        name="qwen3_vl_moe", model_types=("qwen3_vl_moe",), **{**_QWEN3, "offline_name": "qwen3-vl-moe"}
    ),
}

#: The family of the embedded processor (``--model`` not given): Qwen2.5-VL, as before families existed.
DEFAULT_FAMILY = "qwen2_5_vl"

#: ``--model NAME`` -> family, for the offline default processors.
OFFLINE_NAMES: dict[str, str] = {f.offline_name: f.name for f in FAMILIES.values()}


def family_for_model_type(model_type: str) -> Family:
    """The family of a checkpoint's ``model_type``; one line naming the supported ones otherwise."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise QvlError(f"model_type {model_type!r} is not a supported Qwen-VL family; supported: {supported}")


def family_for_processor_class(processor_class: str | None) -> Family | None:
    """The family whose processor_class this is (a processor-only directory has no config.json)."""
    for family in FAMILIES.values():
        if family.processor_class == processor_class:
            return family
    return None


def template_for(family: Family, template: str | None = None) -> ChatTemplate:
    """``--template`` when given (it overrides the family's, as in LLaMA-Factory), else the family's."""
    return chat_template(template or family.template)


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
