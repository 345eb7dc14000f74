"""Batched generation: the decoding options every generating command shares, left-padded batches of
prompts, and one answer's ids and text.

Generation is batched with left padding and an explicit attention mask. transformers 5.x computes the 3-D
RoPE positions of a left-padded Qwen2.5-VL batch from that mask (``get_rope_index`` drops the padding of each
row, and the cached ``rope_deltas`` continue each row's positions while decoding), so a batch gives the same
greedy answers as one row at a time (``tests/test_predict.py`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from qvl_data.errors import QvlError
from qvl_data.processor import IM_END_ID, PAD_ID
from qvl_data.vision import DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from qvl_data.encode import EncodedPrompt
    from qvl_data.format import ProcessorSummary

#: Qwen2.5-VL-Instruct's generation_config.json ends a turn at either token.
EOS_IDS = (IM_END_ID, PAD_ID)


@dataclass
class GenerationOptions:
    """The options every generating command (predict, score) shares: batching, decoding, how images of a
    dataset directory or benchmark are prepared, and the device."""

    batch_size: int = 8
    """Prompts per generate() call (left-padded)."""
    max_new_tokens: int = 1024
    """Most tokens generated per answer (LLaMA-Factory's default)."""
    do_sample: bool = False
    """Sample instead of greedy decoding (greedy: the same answers on every run)."""
    temperature: float = 1.0
    """Sampling temperature (with --do-sample)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (with --do-sample)."""
    top_k: int = 50
    """Sample among the k most likely tokens, 0 for all (with --do-sample)."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already in the prompt or answer (1.0: none; Qwen2.5-VL's own config uses 1.05)."""
    seed: int = 42
    """Seed of the sampling RNG."""
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    """Images read here (a dataset directory, benchmark images): pre-resize those above this many pixels (the
    build's --image-max-pixels). Shards keep their build's pixels."""
    image_min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS
    """Images read here: pre-resize those below this many pixels up to it."""
    processor: str = ""
    """Images and text read here: checkpoint dir or hub id whose tokenizer + image processor to use (the
    build's --model); default: the embedded one. Shards use the processor recorded in their manifest."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cuda`` or ``cpu``."""
    bf16: bool = True
    """On CUDA: weights in bfloat16 (CPU always uses float32)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    quiet: bool = False
    """No progress bars or summary lines (skipped rows and score tables are still printed)."""


def check_generation(cfg: Any) -> None:
    """One-line errors for the generation and device options a predict or score config shares."""
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise QvlError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise QvlError(f"temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise QvlError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise QvlError(f"top_k must be >= 0, got {cfg.top_k}")
    if cfg.repetition_penalty <= 0:
        raise QvlError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise QvlError(f"device must be auto, cuda or cpu, got {cfg.device!r}")


@dataclass(frozen=True)
class Generation:
    """How answers are decoded (the generation options of a predict or score config). The defaults are
    the commands' own, read from :class:`GenerationOptions` so that they live in one place."""

    max_new_tokens: int = GenerationOptions.max_new_tokens
    do_sample: bool = GenerationOptions.do_sample
    temperature: float = GenerationOptions.temperature
    top_p: float = GenerationOptions.top_p
    top_k: int = GenerationOptions.top_k
    repetition_penalty: float = GenerationOptions.repetition_penalty
    seed: int = GenerationOptions.seed

    @classmethod
    def from_config(cls, cfg: GenerationOptions) -> Generation:
        """The decoding values of a predict or score config (fields of the same names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def generation_config(self) -> GenerationConfig:
        """Every decoding value set explicitly: transformers fills unset ones from the checkpoint's
        generation_config.json, and Qwen2.5-VL-Instruct's samples (top_k 1, repetition penalty 1.05)."""
        from transformers import GenerationConfig

        sampling = (
            {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
            if self.do_sample
            else {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # neutral: no warning, nothing inherited
        )
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=list(EOS_IDS),
            pad_token_id=PAD_ID,
            **sampling,
        )


def collate_prompts(prompts: list[EncodedPrompt], pad_id: int = PAD_ID) -> dict[str, Any]:
    """Left-pad the prompts into one batch: ``input_ids`` (pad_id on the left), ``attention_mask`` (0 there),
    and all rows' pixels and grids concatenated in row order (None without images), the keys that
    :func:`qvl_train.steps.batch_to_inputs` reads."""
    length = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        input_ids[i, length - n :] = torch.as_tensor(prompt.input_ids, dtype=torch.long)
        attention_mask[i, length - n :] = 1
    pixels = [torch.from_numpy(p.pixels) for p in prompts if p.pixels is not None and len(p.pixels)]
    grids = [g for p in prompts for g in p.image_grid_thw]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": torch.cat(pixels) if pixels else None,
        "image_grid_thw": torch.tensor(grids, dtype=torch.long) if grids else None,
    }


def answer_ids(generated: torch.Tensor) -> list[int]:
    """One row's generated ids up to (not including) its first end-of-turn or padding token."""
    ids = generated.tolist()
    for k, token in enumerate(ids):
        if token in EOS_IDS:
            return ids[:k]
    return ids


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    prompts: list[EncodedPrompt],
    processor: ProcessorSummary,
    generation: Generation | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """The generated ids of each prompt's answer, up to its end of turn (greedy unless ``generation`` samples).
    Pixels reach the model through :func:`qvl_train.steps.batch_to_inputs`, the training path (uint8 patches
    become the processor's pixel_values on the device); ``device`` and ``dtype`` default to the model's."""
    from qvl_train.steps import batch_to_inputs

    weights = next(model.parameters())
    device, dtype = device or weights.device, dtype or weights.dtype
    generation = generation or Generation()
    batch = collate_prompts(prompts)
    inputs = batch_to_inputs(batch, device, dtype, processor)
    # always the mask: batch_to_inputs drops it for right-padded (here: equal-length) batches, and generate
    # would otherwise infer one from the pad id
    inputs["attention_mask"] = batch["attention_mask"].to(device)
    output = model.generate(**inputs, generation_config=generation.generation_config())
    return [answer_ids(row) for row in output[:, batch["input_ids"].shape[1] :].cpu()]


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """An answer's text: decoded without special tokens and stripped, as LLaMA-Factory's predictions are."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_model_for(
    cfg: Any, adapter: str, local_rank: int = 0
) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
    """The base model ``cfg.model`` with ``adapter`` (none when empty) on ``cfg.device`` (this rank's GPU
    under torchrun), for generation."""
    from qvl_train.distributed import pick_device
    from qvl_train.model import load_for_inference

    device = pick_device(cfg.device, local_rank)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else torch.float32
    model = load_for_inference(cfg.model, adapter, device, dtype, cfg.attn_implementation)
    return model, device, dtype
