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

#: LF's ``qwen`` tool format (``QwenToolUtils`` in its ``data/tool_utils.py``): the tools block appended to
#: the system prompt, ``{tools}`` being one line per tool (qvl_data/template.py ``format_tools``).
QWEN_TOOLS_FORMAT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(frozen=True)
class ChatTemplate:
    """One LLaMA-Factory 0.9.5 chat template (``register_template`` in its ``data/template.py``): the slot
    strings (``{content}`` is the text), the default system prompt ("" for none) and whether it is a
    ``ReasoningTemplate`` (think blocks, see qvl_data/template.py and docs/semantics.md "Model families").

    Tool-calling turns (docs/semantics.md "Tool-calling rows"): a ``function_call`` turn is an answer whose
    content (the calls, as JSON) is written in the tool format, each call between the ``tool_call_words``,
    then closed by ``function_format``; an ``observation`` turn (a tool's result) takes the user's place in
    ``observation_format``; the row's tools go into ``tools_format``, appended to the system prompt."""

    name: str
    system_format: str = "<|im_start|>system\n{content}<|im_end|>\n"
    user_format: str = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assistant_format: str = "{content}<|im_end|>\n"
    function_format: str = "{content}<|im_end|>\n"
    observation_format: str = (
        "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    tools_format: str = QWEN_TOOLS_FORMAT
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
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
    """What training, generation and export need to know about one family: its transformers classes
    (``transformers.models.<module>``), the language model's linears LoRA may target, the vision side
    (frozen: no LoRA, no gradient, no backward), and its tiny random test model (qvl_train/model.py).

    Rotary positions for packing come from ``<base_model_class>.get_rope_index`` (the family's own), run on
    one row at a time (qvl_train/packing.py ``RopeIndex``). Generation stops at the data side's
    ``Family.stop_token_ids``.

    LoRA targets: the decoder layers' ``self_attn.{q,k,v,o}_proj`` and, where the MLP is dense,
    ``mlp.{gate,up,down}_proj``, matched under ``language_model.layers`` only: Qwen2(.5)-VL's vision blocks
    use the same MLP names. In Qwen3-VL-MoE (transformers 5) every layer's MLP is a sparse block whose experts
    are fused 3-D parameters (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I))
    and whose router ``mlp.gate`` is a plain weight: none is an ``nn.Linear``, so LoRA reaches attention
    only, as LLaMA-Factory's ``lora_target: all`` (``find_all_linear_modules``) does on the same
    transformers. The experts and the router stay frozen: a rank-r update per expert would multiply the
    adapter by the 128 experts (and per-expert LoRA on fused parameters is peft's experimental
    ``target_parameters``), and training the router moves the load balance the checkpoint was tuned for.
    A layer of ``mlp_only_layers`` (a dense MLP) is matched by the MLP names as in the dense model.
    """

    family: str
    module: str  # transformers.models.<module>.modeling_<module>
    architecture: str  # the ...ForConditionalGeneration class (config.json architectures)
    config_class: str
    base_model_class: str  # the class whose get_rope_index / get_vision_position_ids the model uses
    tiny_name: str  # --model NAME of its tiny random test model
    #: the sub-module of the inner model that is the vision side (its blocks, merger and, in Qwen3-VL, the
    #: deepstack mergers ``visual.deepstack_merger_list``): frozen, never given LoRA
    vision_module: str = "visual"
    #: the decoder-layer MLP's experts are fused 3-D parameters (LoRA reaches attention only, see above)
    fused_experts: bool = False


MODEL_SIDE: dict[str, ModelSide] = {
    "qwen2_vl": ModelSide(
        family="qwen2_vl",
        module="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        config_class="Qwen2VLConfig",
        base_model_class="Qwen2VLModel",
        tiny_name="tiny-qwen2-vl",
    ),
    "qwen2_5_vl": ModelSide(
        family="qwen2_5_vl",
        module="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        config_class="Qwen2_5_VLConfig",
        base_model_class="Qwen2_5_VLModel",
        tiny_name="tiny",
    ),
    "qwen3_vl": ModelSide(
        family="qwen3_vl",
        module="qwen3_vl",
        architecture="Qwen3VLForConditionalGeneration",
        config_class="Qwen3VLConfig",
        base_model_class="Qwen3VLModel",
        tiny_name="tiny-qwen3-vl",
    ),
    "qwen3_vl_moe": ModelSide(
        family="qwen3_vl_moe",
        module="qwen3_vl_moe",
        architecture="Qwen3VLMoeForConditionalGeneration",
        config_class="Qwen3VLMoeConfig",
        base_model_class="Qwen3VLMoeModel",
        tiny_name="tiny-qwen3-vl-moe",
        fused_experts=True,
    ),
}


def model_side(family: Family | str) -> ModelSide:
    """The model side of ``family`` (a :class:`Family` or its name)."""
    return MODEL_SIDE[family if isinstance(family, str) else family.name]


def model_side_for_config(config: object, name: str = "model") -> ModelSide:
    """The model side of a checkpoint's config (its ``model_type``); one line naming the model, its
    model_type and the supported ones when it is not a Qwen-VL family."""
    model_type = getattr(config, "model_type", None)
    try:
        return model_side(family_for_model_type(str(model_type)))
    except QvlError as e:
        raise QvlError(f"{name}: {e}") from None


def transformers_class(side: ModelSide, which: str) -> type:
    """``side``'s transformers class named by its field ``which`` (``architecture``, ``config_class`` or
    ``base_model_class``), imported from ``transformers.models.<module>``."""
    import importlib

    module = importlib.import_module(f"transformers.models.{side.module}.modeling_{side.module}")
    if which == "config_class":
        module = importlib.import_module(f"transformers.models.{side.module}.configuration_{side.module}")
    return getattr(module, getattr(side, which))
