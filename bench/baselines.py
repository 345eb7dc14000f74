"""The usual way, written the way users write it: what the benchmarks compare qvl against.

* :func:`read_rows` + :func:`encode_row`: a hand-written preprocessing function for ``datasets.map`` (or a
  collator): open each image with PIL, apply LLaMA-Factory's pre-resize, call the transformers Qwen2-VL image
  processor, expand ``<image>`` into its pad tokens, template the turns with the ``qwen2_vl`` strings,
  tokenize each segment, mask the prompt. ``pixel_values`` stay float32, as the processor returns them.
* :class:`OnTheFlyDataset` + :func:`collate_on_the_fly`: LLaMA-Factory / TRL / axolotl style loading: the
  dataset holds the raw rows and every epoch opens the JPEGs, runs the image processor and tokenizes.

It deliberately shares no code with ``qvl_data``'s encode path except ``preresize_image`` (the reference's
resize formula, which a user copies from LLaMA-Factory): the point is to measure the hand-written path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100
PAD_ID = 151643
IMAGE_PAD_ID = 151655
CUTOFF_LEN = 2048
SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"
USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT = "{}<|im_end|>\n"
DEFAULT_SYSTEM = "You are a helpful assistant."


def read_rows(dataset_dir: str | Path, names: list[str]) -> list[dict[str, Any]]:
    """The rows of ``names`` as ``{"system", "messages", "images"}`` (absolute image paths); alpaca and
    sharegpt as described by ``dataset_info.json``. No validation: a user script trusts its data."""
    dataset_dir = Path(dataset_dir)
    info = json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8"))
    rows = []
    for name in names:
        entry = info[name]
        data = json.loads((dataset_dir / entry["file_name"]).read_text(encoding="utf-8"))
        columns = entry.get("columns", {})
        for item in data:
            images = [str(dataset_dir / p) for p in item.get(columns.get("images", "images")) or []]
            if entry.get("formatting", "alpaca") == "sharegpt":
                tags = entry.get("tags", {})
                role, content = tags.get("role_tag", "from"), tags.get("content_tag", "value")
                user = tags.get("user_tag", "human")
                messages = [
                    {"role": "user" if m[role] == user else "assistant", "content": m[content]}
                    for m in item[columns.get("messages", "conversations")]
                ]
                system = item.get(columns["system"]) if "system" in columns else None
            else:
                prompt = "\n".join(
                    x
                    for x in (
                        item.get(columns.get("prompt", "instruction")),
                        item.get(columns.get("query", "input")),
                    )
                    if x
                )
                messages = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": item[columns.get("response", "output")]},
                ]
                system = item.get(columns.get("system", "system"))
            rows.append({"system": system or "", "messages": messages, "images": images})
    return rows


def load_processors() -> tuple[Any, Any]:
    """The same tokenizer and image-processor files qvl uses (loaded through plain transformers calls)."""
    from transformers import AutoTokenizer

    from qvl_data.processor import embedded_processor_dir, load_image_processor

    # ``load_image_processor`` only turns preprocessor_config.json into Qwen2VLImageProcessorPil(**config),
    # which is what a user does with AutoImageProcessor when torchvision is absent.
    return AutoTokenizer.from_pretrained(embedded_processor_dir()), load_image_processor(None)


def encode_row(
    row: dict[str, Any],
    tokenizer: Any,
    image_processor: Any,
    image_max_pixels: int = 262144,
    image_min_pixels: int = 1024,
    cutoff_len: int = CUTOFF_LEN,
) -> dict[str, Any]:
    """One row -> input_ids, labels, float32 pixel_values (n, 1176), image_grid_thw (k, 3)."""
    from PIL import Image

    from qvl_data.vision import preresize_image  # LLaMA-Factory's resize formula, as users copy it

    images = []
    for path in row["images"]:
        with Image.open(path) as image:
            image.load()
            images.append(preresize_image(image, image_max_pixels, image_min_pixels))
    if images:
        out = image_processor(images=images, return_tensors="np")
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        grids = np.asarray(out["image_grid_thw"], dtype=np.int64)
        counts = iter((grids.prod(-1) // image_processor.merge_size**2).tolist())
    else:
        pixel_values = np.zeros((0, 1176), dtype=np.float32)
        grids = np.zeros((0, 3), dtype=np.int64)
        counts = iter(())

    def expand(text: str) -> str:
        while "<image>" in text:
            text = text.replace(
                "<image>", "<|vision_start|>" + "<|image_pad|>" * next(counts) + "<|vision_end|>", 1
            )
        return text

    input_ids: list[int] = []
    labels: list[int] = []
    messages = row["messages"]
    for i in range(0, len(messages) - 1, 2):
        source = USER.format(expand(messages[i]["content"]))
        if i == 0:
            source = SYSTEM.format(row.get("system") or DEFAULT_SYSTEM) + source
        target = ASSISTANT.format(messages[i + 1]["content"])
        source_ids = tokenizer.encode(source, add_special_tokens=False)
        target_ids = tokenizer.encode(target, add_special_tokens=False)
        input_ids += source_ids + target_ids
        labels += [IGNORE_INDEX] * len(source_ids) + target_ids
    return {
        "input_ids": input_ids[:cutoff_len],
        "labels": labels[:cutoff_len],
        "pixel_values": pixel_values,
        "image_grid_thw": grids,
    }


# ------------------------------------------------------------------------------ build: datasets.map


def map_features():
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "pixel_values": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "image_grid_thw": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        }
    )


def build_with_datasets_map(
    dataset_dir: str | Path,
    names: list[str],
    out_dir: Path,
    num_proc: int,
    writer_batch_size: int = 64,
    new_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The hand-written preprocessing script: ``Dataset.from_list(rows).map(fn, num_proc=...)`` writing an
    Arrow cache file (as a file-backed ``load_dataset`` would). ``writer_batch_size`` 64 (the default 1000
    rows would hold gigabytes of float32 pixels in memory before the first write). ``new_fingerprint`` skips
    datasets' hashing of the function and its arguments (the tokenizer: seconds); only the smoke run uses it."""
    import time

    import datasets

    datasets.disable_progress_bars()
    started = time.perf_counter()
    tokenizer, image_processor = load_processors()
    rows = read_rows(dataset_dir, names)
    ds = datasets.Dataset.from_list(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    processed = ds.map(
        encode_row,
        fn_kwargs={"tokenizer": tokenizer, "image_processor": image_processor},
        remove_columns=ds.column_names,
        features=map_features(),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(out_dir / "processed.arrow"),
        writer_batch_size=writer_batch_size,
        load_from_cache_file=False,
        new_fingerprint=new_fingerprint,
    )
    seconds = time.perf_counter() - started
    lengths = [len(x) for x in processed.data.column("input_ids").to_pylist()]
    grids = processed.data.column("image_grid_thw")
    pixel_values = processed.data.column("pixel_values")
    pixel_bytes = 0
    for chunk in pixel_values.chunks:  # list<list<float32>>: the float buffer itself
        pixel_bytes += chunk.values.values.nbytes
    return {
        "pipeline_s": seconds,
        "rows": len(processed),
        "tokens": int(sum(lengths)),
        "images": int(sum(len(g) for g in grids.to_pylist())),
        "pixel_bytes": int(pixel_bytes),
        "output_bytes": int(sum(Path(f["filename"]).stat().st_size for f in processed.cache_files)),
    }


# ----------------------------------------------------------------------------- loader: on the fly


class OnTheFlyDataset:
    """A map-style dataset over the raw rows; each item is opened, processed and tokenized when read."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        self._processors: tuple[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {"rows": self.rows, "_processors": None}  # workers load their own, like the usual trainers

    def processors(self) -> tuple[Any, Any]:
        if self._processors is None:
            self._processors = load_processors()
        return self._processors

    def __getitem__(self, i: int) -> dict[str, Any]:
        tokenizer, image_processor = self.processors()
        return encode_row(self.rows[i], tokenizer, image_processor)


def collate_on_the_fly(items: list[dict[str, Any]], multiple: int = 8) -> dict[str, Any]:
    """Pad like the usual collators; float32 pixel_values concatenated; the model's keyword arguments."""
    import torch

    length = max(len(x["input_ids"]) for x in items)
    length = -(-length // multiple) * multiple
    input_ids = torch.full((len(items), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [torch.from_numpy(x["pixel_values"]) for x in items if len(x["pixel_values"])]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([torch.from_numpy(x["image_grid_thw"]) for x in items])
    batch["mm_token_type_ids"] = (input_ids == IMAGE_PAD_ID).int()
    return batch


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
