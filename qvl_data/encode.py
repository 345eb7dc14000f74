"""One unified record -> the tensors a training step needs (or the reason it cannot be trained on), and the
prompts generation starts from: :func:`encode_prompt_record` (a record's), :func:`prompt_and_answer` (a
build row's), and :func:`processor_summary` (the processor facts a manifest records, for prompts encoded
outside a build).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qvl_data import vision
from qvl_data.family import chat_template
from qvl_data.format import ProcessorSummary
from qvl_data.image_store import bytes_key, image_bytes, source_name
from qvl_data.processor import (
    IM_END_ID,
    IMAGE_PAD_ID,
    IMAGE_PAD_TOKEN,
    VISION_END_ID,
    VISION_END_TOKEN,
    VISION_START_ID,
    VISION_START_TOKEN,
)
from qvl_data.schema import IMAGE_PLACEHOLDER, EmbeddedImage, ImageSource, Record, Rejection, row_location
from qvl_data.shards import PIXEL_FORMATS
from qvl_data.template import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    format_function_call,
    last_answer_start,
)

NEWLINE_ID = 198  # "\n", which the template puts after every <|im_end|>


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that changes the encoded output besides the record and the processor: a task's view of
    the BuildConfig fields of the same names (qvl_data/config.py declares them and their defaults)."""

    cutoff_len: int = 2048
    image_max_pixels: int = vision.DEFAULT_IMAGE_MAX_PIXELS  # pre-resize bounds (the reference yaml's)
    image_min_pixels: int = vision.DEFAULT_IMAGE_MIN_PIXELS
    mask_history: bool = False
    # "uint8": patches before rescale/normalize; "float32": pixel_values as is; "webp": the uint8 patches of
    # each image as one lossless WebP
    pixel_format: str = "uint8"
    max_decode_pixels: int = vision.MAX_IMAGE_PIXELS  # decompression-bomb guard, checked before decoding
    # the chat template (LLaMA-Factory's name, qvl_data/family.py TEMPLATES): the build resolves it from
    # --template or the model's family; a reasoning template's think handling follows enable_thinking
    template: str = DEFAULT_TEMPLATE
    enable_thinking: bool = True
    preserve_thinking: bool = False

    def __post_init__(self) -> None:
        if self.pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {self.pixel_format!r}")
        if self.cutoff_len < 1:
            raise ValueError("cutoff_len must be positive")
        chat_template(self.template)  # one line naming the supported ones


@dataclass
class EncodedRow:
    id: str
    source: str
    index: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    image_paths: list[str] = field(default_factory=list)
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    # per image: original (w, h) and (w, h) after the pre-resize, before the processor's smart_resize
    image_sizes: list[tuple[int, int, int, int]] = field(default_factory=list)
    # all images' patches stacked: (n_patches, 3*p*p) uint8 or (n, 3*2*p*p) float32 for the family's patch
    # side p (14: 588 / 1176; Qwen3-VL's 16: 768 / 1536); for "webp", one WebP per image
    pixels: np.ndarray | list[bytes] | None = None
    # per image: the image store's key (a build's rows; their pixels are in the store, ``pixels`` is None)
    image_keys: list[str] = field(default_factory=list)

    @property
    def pixel_bytes(self) -> int:
        """Bytes of stored pixels."""
        if self.pixels is None:
            return 0
        return self.pixels.nbytes if isinstance(self.pixels, np.ndarray) else sum(map(len, self.pixels))

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def image_tokens(self) -> int:
        return self.input_ids.count(IMAGE_PAD_ID)


def expand_image_placeholders(messages: list[dict], token_counts: list[int]) -> list[dict]:
    """Replace the k-th ``<image>`` of the conversation by its vision span of ``token_counts[k]`` pads."""
    counts = iter(token_counts)
    expanded = []
    for message in messages:
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        content = pieces[0]
        for piece in pieces[1:]:
            content += VISION_START_TOKEN + IMAGE_PAD_TOKEN * next(counts) + VISION_END_TOKEN + piece
        expanded.append({"role": message["role"], "content": content})
    return expanded


def _image_spans_intact(input_ids: list[int], n_images: int, n_image_tokens: int) -> bool:
    ids = np.asarray(input_ids)
    return (
        int((ids == IMAGE_PAD_ID).sum()) == n_image_tokens
        and int((ids == VISION_START_ID).sum()) == n_images
        and int((ids == VISION_END_ID).sum()) == n_images
    )


def _plain(message: str) -> str:
    """PIL names files by their handle's repr (``<_io.BufferedReader name='x.png'>``): keep only the name."""
    message = re.sub(r"<_io\.\w+ name=(.+?)>", r"\1", message)
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the file", message)


class _ImageFailure(Exception):
    """Image ``k`` of a record (a file path, or embedded bytes) could not be used."""

    def __init__(self, k: int, source: ImageSource, error: vision.ImageError):
        super().__init__(error.message)
        self.k, self.path, self.error = k, source_name(source), error


def _open_source(source: ImageSource, max_pixels: int) -> Any:
    """A record's image decoded, with the same checks for a file and for embedded bytes."""
    if isinstance(source, EmbeddedImage):
        return vision.decode_image(source.data, source.name, max_pixels)
    return vision.open_image(source, max_pixels=max_pixels)


def _process_images(
    sources: list[ImageSource], image_processor, options: EncodeOptions
) -> list[vision.ProcessedImage]:
    """Open, pre-resize and process a record's images: the one image path of training and generation."""
    processed = []
    for k, path in enumerate(sources):
        try:
            image = _open_source(path, options.max_decode_pixels)
            processed.append(
                vision.process_image(
                    image,
                    image_processor,
                    "float32" if options.pixel_format == "float32" else "uint8",
                    options.image_max_pixels,
                    options.image_min_pixels,
                )
            )
        except vision.ImageError as e:
            raise _ImageFailure(k, path, e) from None
    return processed


@dataclass(frozen=True)
class MeasuredImage:
    """What tokenizing a row needs of one image, read from its header: no pixel is decoded."""

    key: str  # qvl_data/image_store.py image_key
    grid_thw: tuple[int, int, int]
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


def measure_image(
    source, image_processor, options: EncodeOptions, known: tuple[str, tuple[int, int]] | None = None
) -> tuple[str | None, MeasuredImage | vision.ImageError]:
    """(the image's key, its sizes and grid) from its bytes and header, or (its key or None, the error
    a build's row gets for it: the same as :func:`encode_record`'s for a missing, unreadable, oversized or
    degenerate image). ``known``: the key and header size an earlier build measured for this unchanged
    file (the image store's key cache), so nothing is read."""
    key = None
    try:
        if known is not None:
            key, original = known
        else:
            data = image_bytes(source)
            key = bytes_key(data)
            original = vision.image_header_size(data, source_name(source), options.max_decode_pixels)
        resized = vision.preresized_size(*original, options.image_max_pixels, options.image_min_pixels)
        grid = vision.image_grid_thw(image_processor, *resized)
        return key, MeasuredImage(key, grid, original, resized)
    except vision.ImageError as e:
        return key, e


def _rejecter(record: Record, file: str):
    def reject(reason: str, message: str) -> Rejection:
        where = row_location(file, record["index"]) if file else f"{record['source']} row {record['index']}"
        return Rejection(record["source"], record["index"], reason, f"{where}: {message}", file)

    return reject


def _image_failure(reject, failure: _ImageFailure) -> Rejection:
    return reject(
        failure.error.code, f"field images[{failure.k}] {failure.path!r}: {_plain(failure.error.message)}"
    )


def encode_record(
    record: Record,
    tokenizer,
    image_processor,
    options: EncodeOptions,
    file: str = "",
    measured: list[MeasuredImage | vision.ImageError] | None = None,
) -> EncodedRow | Rejection:
    """Load and process the images, expand placeholders, template, mask and truncate.

    ``file`` is the dataset file the record came from: rejections name it like every other rejection
    (``row_location``); without it they fall back to the source name. ``measured`` (a build's: one
    :func:`measure_image` per image, an error where it failed) replaces the pixels: the row gets the
    images' keys, sizes and grids, and its pixels stay in the image store.
    """
    reject = _rejecter(record, file)
    if measured is not None:
        for k, image in enumerate(measured):
            if isinstance(image, vision.ImageError):
                return _image_failure(reject, _ImageFailure(k, record["images"][k], image))
        grids = [tuple(int(x) for x in m.grid_thw) for m in measured]
        sizes = [(*m.original_size, *m.resized_size) for m in measured]
        counts = [vision.image_token_count(g, image_processor.merge_size) for g in grids]
        return _encode_text(
            record, reject, tokenizer, options, grids, sizes, counts, None, [m.key for m in measured]
        )
    try:
        processed = _process_images(record["images"], image_processor, options)
    except _ImageFailure as failure:
        return _image_failure(reject, failure)
    grids, sizes, pixels, token_counts = [], [], [], []
    for image in processed:
        grids.append(tuple(int(x) for x in image.grid_thw))
        sizes.append((*image.original_size, *image.resized_size))
        if options.pixel_format == "webp":
            geometry = {"merge_size": image_processor.merge_size, "patch_size": image_processor.patch_size}
            pixels.append(vision.encode_patches_webp(image.pixels, image.grid_thw, **geometry))
        else:
            pixels.append(image.pixels)
        token_counts.append(vision.image_token_count(image.grid_thw, image_processor.merge_size))
    if pixels:
        stacked = pixels if options.pixel_format == "webp" else np.concatenate(pixels)
    else:
        stacked = None
    return _encode_text(record, reject, tokenizer, options, grids, sizes, token_counts, stacked, [])


def _encode_text(
    record: Record, reject, tokenizer, options: EncodeOptions, grids, sizes, token_counts, pixels, keys
) -> EncodedRow | Rejection:
    """The text side of :func:`encode_record`, once the images' grids are known."""
    messages = expand_image_placeholders(record["messages"], token_counts)
    input_ids, labels, truncated = encode_conversation(
        tokenizer,
        messages,
        record["system"],
        options.cutoff_len,
        options.mask_history,
        options.template,
        options.enable_thinking,
        options.preserve_thinking,
        record.get("tools"),
    )
    if grids and not _image_spans_intact(input_ids, len(grids), sum(token_counts)):
        return reject(
            "image_truncated",
            f"cutoff_len {options.cutoff_len} would cut an image span ({sum(token_counts)} image tokens, "
            f"{len(input_ids)} tokens kept); raise --cutoff-len or lower --image-max-pixels",
        )
    return EncodedRow(
        id=record["id"],
        source=record["source"],
        index=record["index"],
        input_ids=input_ids,
        labels=labels,
        truncated=truncated,
        image_paths=[source_name(image) for image in record["images"]],
        image_grid_thw=grids,
        image_sizes=sizes,
        pixels=pixels,
        image_keys=keys,
    )


# ------------------------------------------------------------------------------------------ generation


@dataclass
class EncodedPrompt:
    """What a model generates one answer from: the prompt ids (image spans expanded) and its images."""

    id: str
    source: str
    index: int
    input_ids: list[int]
    reference: str | None  # the record's last answer, when it had one
    image_paths: list[str] = field(default_factory=list)
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    # all images' patches stacked: (n_patches, 3*p*p) uint8, or (n, 3*2*p*p) float32 with "float32"
    pixels: np.ndarray | None = None


def encode_prompt_record(
    record: Record, tokenizer, image_processor, options: EncodeOptions | None = None, file: str = ""
) -> EncodedPrompt | Rejection:
    """A record -> the prompt of its last answer, through the build's image path and template.

    A record that ends with an answer (every record ``qvl_data.sources`` reads) gives that answer as the
    ``reference`` and the conversation before it as the prompt; one that ends with a user message (a
    benchmark question) is all prompt. A last function call's reference is the calls as the template
    writes them (``<tool_call>...</tool_call>``, what the model was trained to write). The images go
    through the same pre-resize and processor as :func:`encode_record`, and the prompt ids are
    :func:`qvl_data.template.encode_prompt`, so for a row the build did not truncate they equal the shard
    row's ids before its last answer. ``options`` supplies the image bounds; the prompt is never truncated
    (``cutoff_len`` bounds training rows, not generation), and pixels are uint8 patches unless
    ``pixel_format`` is ``"float32"``.
    """
    options = options or EncodeOptions()
    reject = _rejecter(record, file)
    messages, reference = list(record["messages"]), None
    if messages and messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"]
    elif messages and messages[-1]["role"] == "function_call":
        reference = format_function_call(options.template, messages.pop()["content"])
    try:
        processed = _process_images(record["images"], image_processor, options)
    except _ImageFailure as failure:
        return _image_failure(reject, failure)
    token_counts = [vision.image_token_count(p.grid_thw, image_processor.merge_size) for p in processed]
    messages = expand_image_placeholders(messages, token_counts)
    input_ids = encode_prompt(
        tokenizer,
        messages,
        record["system"],
        options.template,
        options.enable_thinking,
        options.preserve_thinking,
        record.get("tools"),
    )
    return EncodedPrompt(
        id=record["id"],
        source=record["source"],
        index=record["index"],
        input_ids=input_ids,
        reference=reference,
        image_paths=[source_name(image) for image in record["images"]],
        image_grid_thw=[tuple(int(x) for x in p.grid_thw) for p in processed],
        pixels=np.concatenate([p.pixels for p in processed]) if processed else None,
    )


def prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A build row -> (its ids before its last answer, that answer's ids without the ``<|im_end|>\n`` the
    template closes it with, or the ``<|im_end|>`` alone when truncation kept only that). The labels say
    where the answer starts and ends; a row without a trained answer raises ValueError."""
    start = last_answer_start(labels)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    answer = input_ids[start:end]
    if answer[-2:] == [IM_END_ID, NEWLINE_ID]:
        answer = answer[:-2]
    elif answer[-1:] == [IM_END_ID]:
        answer = answer[:-1]
    return input_ids[:start], answer


def processor_summary(model: str | None, tokenizer=None, image_processor=None) -> ProcessorSummary:
    """The processor facts a build's manifest records (vocabulary, special ids, normalization, geometry) for
    ``model`` (None: the embedded processor); the tokenizer and image processor are loaded unless given."""
    from qvl_data.processor import load_image_processor, load_tokenizer, processor_files_digest

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
    image_processor = image_processor if image_processor is not None else load_image_processor(model)
    size = image_processor.size
    return ProcessorSummary(
        model=model or "embedded",
        digest=processor_files_digest(model),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_mean=[float(x) for x in image_processor.image_mean],
        image_std=[float(x) for x in image_processor.image_std],
        rescale_factor=float(image_processor.rescale_factor),
        patch_size=int(image_processor.patch_size),
        temporal_patch_size=int(image_processor.temporal_patch_size),
        merge_size=int(image_processor.merge_size),
        min_pixels=int(size["shortest_edge"]),
        max_pixels=int(size["longest_edge"]),
    )
