"""``qvl-train export``: merge a LoRA adapter into its base weights and write a Hugging Face model directory.

The directory is what the family's ``...ForConditionalGeneration.from_pretrained`` (Qwen2.5-VL's, Qwen3-VL's,
...: qvl_data/family.py), ``AutoTokenizer``,
``AutoProcessor`` and serving tools (vLLM, TGI) load without peft:

* ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), in
  the key layout of the released checkpoints (``model.layers.*``, ``visual.*``, ``lm_head``: transformers 5
  converts its in-memory ``model.language_model.*`` names back when saving), ``config.json``
  (architectures, the exported dtype), ``generation_config.json`` (the base model's);
* the processor files, copied byte for byte: the base checkpoint's when it has a complete set
  (``tokenizer.json``, ``tokenizer_config.json``, ``preprocessor_config.json``; a hub id's from the Hugging
  Face cache), else the embedded processor's (``qvl_data.processor``), never a mix of the two;
* ``qvl_export.json``: which base and which adapter (path, sha256 of its config and weights) were merged.

Chat template files. transformers 5.24 reads a processor's template from ``chat_template.json`` (the
legacy file, which wins when present) or ``chat_template.jinja``, and a tokenizer's from
``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``; when it *saves* a processor it
writes ``chat_template.jinja`` and a ``processor_config.json``. The released Qwen2.5-VL checkpoints (and
the embedded processor, built like them) carry ``chat_template.json`` plus the template inside
``tokenizer_config.json`` and no ``processor_config.json``, which transformers treats as empty. We keep the
base's files as they are, so the exported model tokenizes and templates exactly like the model it was
trained from, and add a ``chat_template.jinja`` only where the tokenizer or the processor would otherwise
have no template.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qvl_data.errors import QvlError
from qvl_data.files import publish_directory, sha256_file, staging_directory
from qvl_data.processor import (  # a checkpoint dir's or hub id's file, as the build reads it
    CHAT_TEMPLATE,
    PROCESSOR_FILES,
    embedded_processor_dir,
    load_image_processor,
    load_tokenizer,
    model_family,
    resolve_processor_file,
)
from qvl_train.config import TrainConfig, coerce_types, parse_tool_config
from qvl_train.infer.files import output_lock, require_regular_file
from qvl_train.model import load_for_inference, resolve_model_path

#: Processor files copied into the export when the source has them: qvl's set plus the two that newer
#: checkpoints (saved by transformers >= 4.5x) may add.
EXPORT_PROCESSOR_FILES = (*PROCESSOR_FILES, "video_preprocessor_config.json", "processor_config.json")
#: Without all three, a source's processor files are not used (the embedded processor's are).
REQUIRED_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RECORD = "qvl_export.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

DESCRIPTION = (
    "Merge a LoRA adapter (a qvl-train output_dir or checkpoint-N) into its base Qwen-VL model and write a "
    "Hugging Face model directory (safetensors, config, generation config, tokenizer, image processor, chat "
    "template) that transformers and vLLM load without peft."
)


@dataclass
class ExportConfig:
    adapter: str = TrainConfig.output_dir
    """The LoRA adapter directory (adapter_config.json + adapter_model.safetensors): a qvl-train output_dir
    or one of its checkpoint-N directories."""
    output_dir: str = ""
    """Where the merged model directory goes (required). It is written next to itself as a temporary
    directory and renamed into place at the end, so a failed export leaves nothing behind."""
    model: str = ""
    """The base model the adapter was trained on: a checkpoint dir, a hub id or ``tiny``. Empty: the
    adapter's own record of it (base_model_name_or_path in adapter_config.json)."""
    dtype: str = "auto"
    """dtype of the written weights: ``auto`` (the base checkpoint's own, bfloat16 for Qwen2.5-VL-7B),
    bfloat16, float16 or float32. The merge itself always runs in float32."""
    overwrite: bool = False
    """Replace an earlier export in output_dir (a directory holding qvl_export.json; the old directory is
    removed only once the new one is complete). A non-empty directory qvl did not write is never replaced."""
    allow_base_mismatch: bool = False
    """Merge even when --model is not the base recorded in the adapter (e.g. the same weights under another
    name). Shapes must still fit."""
    max_shard_size: str = "5GB"
    """Largest safetensors file; bigger models are split into model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json (5GB: the Hugging Face convention)."""

    def __post_init__(self) -> None:
        coerce_types(self)
        if not self.output_dir:
            raise QvlError("--output-dir is required (where the merged model directory goes)")
        if not self.adapter:
            raise QvlError("--adapter is required (a LoRA adapter directory)")
        if self.dtype not in ("auto", *DTYPES):
            raise QvlError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if not re.fullmatch(r"\d+(?:[KMG]i?B)?", self.max_shard_size.strip(), re.IGNORECASE):
            raise QvlError(f"max_shard_size must be a size such as 5GB or 500MB, got {self.max_shard_size!r}")


def run(argv: list[str]) -> None:
    export(parse_tool_config(ExportConfig, argv, "qvl-train export", DESCRIPTION))


# ---------------------------------------------------------------------------------------------- checks


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    if not adapter.is_dir():
        raise QvlError(f"--adapter {adapter}: no such directory")
    if not os.path.lexists(path):
        raise QvlError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
    require_regular_file(path, "adapter config")
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise QvlError(f"--adapter {adapter}: has adapter_config.json but no adapter_model.safetensors")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise QvlError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QvlError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise QvlError(f"{path}: peft_type {config['peft_type']!r}; qvl-train export merges LoRA adapters")
    return config


def model_names(name: str) -> set[str]:
    """Spellings under which one model may be recorded: the string, its resolved path, and its name (the
    hub id's last part, or the directory's; a Hugging Face cache snapshot
    ``models--owner--name/snapshots/x`` counts as ``owner/name``), so ``/models/Qwen2.5-VL-7B-Instruct``
    matches ``Qwen/Qwen2.5-VL-7B-Instruct``."""
    names = {name.rstrip("/")}
    path = Path(resolve_model_path(name)).expanduser()
    parts = path.parts
    if path.exists():
        path = path.resolve()
        names.add(str(path))
        parts = path.parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            hub_id = parts[-3].removeprefix("models--").replace("--", "/", 1)
            names.add(hub_id)
            parts = tuple(hub_id.split("/"))
    if parts:
        names.add(parts[-1].lower())
    return names


def check_base(recorded: str | None, model: str, allow_mismatch: bool) -> None:
    """Refuse to merge into a base other than the one the adapter was trained on: a same-shaped model (the
    -Instruct weights vs another fine-tune of them) merges without complaint and gives a broken model."""
    if not recorded or model_names(recorded) & model_names(model):
        return
    if allow_mismatch:
        print(
            f"warning: the adapter was trained on {recorded}; merging it into {model} (--allow-base-mismatch)"
        )
        return
    raise QvlError(
        f"the adapter was trained on {recorded}, not {model}; pass the same --model (or leave it out), or "
        "--allow-base-mismatch if they are the same weights"
    )


def check_output_dir(out: Path, overwrite: bool, keep: list[Path]) -> None:
    """Refuse a non-empty output_dir unless it is an earlier export (it holds qvl_export.json) and
    --overwrite is given, and any output_dir that is (or holds) the base model or the adapter: replacing it
    would delete what the export reads."""
    resolved = out.expanduser().resolve()
    for path in keep:
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise QvlError(
                f"--output-dir {out} is or contains {path}, which the export reads; choose another"
            )
    if out.exists() and not out.is_dir():
        raise QvlError(f"--output-dir {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / RECORD).is_file():
        raise QvlError(
            f"--output-dir {out} is not empty and not a qvl export (no {RECORD}); qvl replaces only its own "
            "exports: choose another directory"
        )
    if not overwrite:
        raise QvlError(f"--output-dir {out} is not empty; pass --overwrite to replace it")


def export_dtype(choice: str, model_path: str) -> torch.dtype:
    """``auto``: the dtype the base checkpoint records (``dtype``; ``torch_dtype`` before transformers 5)."""
    if choice != "auto":
        return DTYPES[choice]
    from transformers import AutoConfig

    try:
        recorded = AutoConfig.from_pretrained(model_path).dtype
    except (OSError, ValueError) as e:
        raise QvlError(
            f"{model_path}: cannot read the model config ({str(e).strip().splitlines()[0]})"
        ) from None
    if isinstance(recorded, str):
        recorded = DTYPES.get(recorded)
    return recorded if recorded in DTYPES.values() else torch.float32


# ------------------------------------------------------------------------------------- processor files


def processor_files(model_path: str) -> tuple[str, dict[str, Path]]:
    """("base", files) when the base checkpoint has a complete processor, else ("embedded", files).

    Checked before any weight is loaded: the tokenizer and image processor must load through qvl's own
    loaders (the ones the build used) and the image processor must be Qwen2-VL's, which is what
    AutoProcessor and vLLM pick from ``image_processor_type``."""
    files = {
        name: path for name in EXPORT_PROCESSOR_FILES if (path := resolve_processor_file(model_path, name))
    }
    origin = "base"
    if not all(name in files for name in REQUIRED_PROCESSOR_FILES):
        # the embedded processor of the base's family (config.json model_type): Qwen3-VL's for a Qwen3-VL base
        origin, embedded = "embedded", embedded_processor_dir(model_family(model_path))
        files = {name: embedded / name for name in EXPORT_PROCESSOR_FILES if (embedded / name).is_file()}
    source = str(next(iter(files.values())).parent)
    kind = json.loads(files["preprocessor_config.json"].read_text(encoding="utf-8")).get(
        "image_processor_type"
    )
    if not str(kind).startswith("Qwen2VLImageProcessor"):
        raise QvlError(f"{files['preprocessor_config.json']}: image_processor_type {kind!r}, not Qwen2-VL's")
    load_tokenizer(source)
    load_image_processor(source)
    return origin, files


def missing_chat_template(out: Path) -> str | None:
    """The template to write as chat_template.jinja when the tokenizer or the processor in ``out`` would
    otherwise load without one (see the module docstring); None when both have one."""
    if (out / "chat_template.jinja").is_file():
        return None
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    processor_template = None
    if (out / "chat_template.json").is_file():
        processor_template = json.loads((out / "chat_template.json").read_text(encoding="utf-8")).get(
            "chat_template"
        )
    tokenizer_template = tokenizer_config.get("chat_template")
    if isinstance(processor_template, str) and isinstance(tokenizer_template, str):
        return None
    for template in (processor_template, tokenizer_template):
        if isinstance(template, str):
            return template
    if _patch_size(out) != 14:  # Qwen3-VL: qwen2_vl's jinja (with its default system prompt) would be wrong
        return None
    return CHAT_TEMPLATE  # neither has one: the template qvl trained with (qwen2_vl, docs/semantics.md)


def _patch_size(out: Path) -> int:
    """The image processor's patch size in ``out`` (14 when it says none: Qwen2-VL's default)."""
    path = out / "preprocessor_config.json"
    if not path.is_file():
        return 14
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("patch_size", 14))
    except (OSError, ValueError, TypeError, AttributeError):
        return 14


# ----------------------------------------------------------------------------------------------- export


def _default_file_mode() -> int:
    umask = os.umask(0)  # the only way to read it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lock_path(out: Path) -> Path:
    """The lock of an export into ``out``: beside it, since the export replaces ``out`` whole."""
    return out.parent / f".{out.name}.qvl-export.lock"


def export(cfg: ExportConfig) -> Path:
    """Merge ``cfg.adapter`` into its base and publish the model directory at ``cfg.output_dir``; the
    output's lock (:func:`lock_path`) is held from the check of ``cfg.output_dir`` to the publishing."""
    with ExitStack() as hold:
        return _export(cfg, hold)


def _export(cfg: ExportConfig, hold: ExitStack) -> Path:
    import peft
    import transformers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    adapter = Path(cfg.adapter).expanduser()
    adapter_config = read_adapter_config(adapter)
    recorded = adapter_config.get("base_model_name_or_path")
    model = cfg.model or recorded
    if not model:
        raise QvlError(f"{adapter}/adapter_config.json records no base model; pass --model")
    check_base(recorded, model, cfg.allow_base_mismatch)
    model_path = resolve_model_path(model)
    out = Path(cfg.output_dir).expanduser()
    check_output_dir(out, cfg.overwrite, [adapter, Path(model_path).expanduser()])
    hold.enter_context(output_lock(lock_path(out), out, "qvl-train export"))
    dtype = export_dtype(cfg.dtype, model_path)
    origin, processor = processor_files(model_path)  # fail fast, before minutes of loading weights

    # Merge in float32, then cast. peft adds the delta in the base weight's dtype (delta.to(weight.dtype)):
    # on bf16 weights scale * B @ A would be rounded to bf16's 8-bit mantissa before the add and the sum
    # rounded again, so most of a small LoRA update's low bits would vanish. bf16 -> fp32 is exact, so a
    # float32 merge followed by one cast to bf16 gives the bf16 weights closest to base + adapter. The
    # price is 4 bytes per parameter of memory while merging (about 33 GB for the 7B).
    print(f"loading {model} + {adapter} (float32) ...", flush=True)
    try:
        peft_model = load_for_inference(model, str(adapter), torch.device("cpu"), torch.float32)
    except (RuntimeError, ValueError) as e:  # e.g. "size mismatch for ...": a base of other shapes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = " ".join(lines[:2]) or type(e).__name__  # torch puts the first mismatch on line 2
        raise QvlError(f"cannot apply {adapter} to {model}: {detail}") from None
    layers = sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    saved = sum(isinstance(m, ModulesToSaveWrapper) for m in peft_model.modules())
    if layers == 0:
        raise QvlError(f"{adapter}: the adapter wraps no module of {model}; nothing to merge")
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)  # safe: refuse weights that turn inf/NaN
    except ValueError as e:
        raise QvlError(f"{adapter}: {str(e).strip().splitlines()[0]}") from None
    merged.to(dtype)
    merged.config.use_cache = True  # the released checkpoints' value (inference default)

    try:
        tmp = staging_directory(out)
    except OSError as e:
        raise QvlError(f"--output-dir {out}: cannot create a directory next to it ({e.strerror})") from None
    try:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        if not (tmp / "generation_config.json").is_file():  # a base without one: the derived defaults
            merged.generation_config.save_pretrained(tmp)
        for name, path in processor.items():
            shutil.copyfile(path, tmp / name)
        template = missing_chat_template(tmp)
        if template is not None:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        weights = next(adapter / name for name in ADAPTER_WEIGHTS if (adapter / name).is_file())
        record = {
            "base_model": model,
            "base_model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
            "adapter": str(adapter.resolve()),
            "adapter_base_model": recorded,
            "adapter_config_sha256": sha256_file(adapter / "adapter_config.json"),
            "adapter_weights_sha256": sha256_file(weights),
            "lora": {
                key: adapter_config.get(key)
                for key in ("r", "lora_alpha", "target_modules", "modules_to_save", "use_rslora", "use_dora")
            },
            "merged_lora_layers": layers,
            "merged_modules_to_save": saved,
            "dtype": _dtype_name(dtype),
            "processor_files": origin,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # safetensors writes its files 0600 (a private temp file renamed), unlike every other file here; a
        # server running as another user (a vLLM container) could then read the config but not the weights.
        mode = _default_file_mode()
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(mode)
        # Replaces an old export (or an empty directory) only now; the check above refused any other.
        publish_directory(tmp, out, lambda _path: False)
    except OSError as e:  # a full disk, a read-only folder: the previous export (if any) is untouched
        raise QvlError(f"writing the export {out} failed ({e.strerror or e}); {out} is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    extra = f" and {saved} modules_to_save" if saved else ""
    source = "the base" if origin == "base" else "the embedded processor"
    print(
        f"merged {layers} LoRA layers{extra} into {model}; wrote {out} ({size / 1e9:.2f} GB, "
        f"{_dtype_name(dtype)}, processor files from {source})"
    )
    return out
