"""Small generated datasets for tests: a dataset_info.json, a data file and images."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from qvl_data.format import ProcessorSummary


def write_dataset(dataset_dir: Path, name: str, rows: list, formatting: str = "sharegpt", **entry) -> Path:
    """Write ``rows`` as ``<name>.json`` and register it in ``dataset_info.json`` (merged with existing)."""
    register_dataset(dataset_dir, name, f"{name}.json", formatting, **entry)
    (dataset_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return dataset_dir


def register_dataset(
    dataset_dir: Path, name: str, file_name: str, formatting: str = "sharegpt", **entry
) -> Path:
    """Add ``name`` (its data in ``file_name``) to ``dataset_dir/dataset_info.json``, merged with what is
    there; sharegpt entries get the ``messages``/``images`` columns and ``role``/``content`` tags."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    info_path = dataset_dir / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if formatting == "sharegpt":
        entry.setdefault("columns", {"messages": "messages", "images": "images"})
        entry.setdefault(
            "tags",
            {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        )
    info[name] = {"file_name": file_name, "formatting": formatting, **entry}
    info_path.write_text(json.dumps(info, indent=1))
    return dataset_dir


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (RGB), with junk instead of pixel data: a
    decompression bomb that must be refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> str:
    """A random image of ``size`` (w, h) in ``mode``; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path.name


def chat(user: str, answer: str, *more: str) -> list[dict]:
    turns = [user, answer, *more]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def processor_summary(**overrides) -> ProcessorSummary:
    """The embedded Qwen2.5-VL processor's summary as a build records it in the manifest, with overrides."""
    base = {
        "model": "embedded",
        "digest": "",
        "vocab_size": 151665,
        "pad_token_id": 151643,
        "eos_token_id": 151645,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
    }
    return ProcessorSummary(**{**base, **overrides})


def tiny_lora(model: str = "tiny", **options):
    """A tiny model with LoRA (no dropout, the given TrainConfig ``options``) and a non-zero, seeded B, so
    every LoRA weight gets a gradient; fp32 on the CPU."""
    import torch

    from qvl_train.config import TrainConfig
    from qvl_train.model import load_model

    torch.manual_seed(0)
    lora = load_model(
        TrainConfig(model=model, lora_dropout=0.0, **options), torch.device("cpu"), torch.float32
    )
    generator = torch.Generator().manual_seed(1)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return lora
