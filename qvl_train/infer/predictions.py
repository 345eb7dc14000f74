"""Answer a stream of prompts in batches and write the predictions file: one JSON line per prompt, in
input order (id, source, index, prompt, reference, prediction).

Rows are generated in length order within a window of a few batches (less padding) and written in input
order. The file is written through :func:`qvl_train.infer.files.atomic_output`: it appears, complete,
when the last row is answered.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvl_data.processor import IMAGE_PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN
from qvl_data.schema import Rejection
from qvl_train.distributed import Dist
from qvl_train.infer.files import atomic_output
from qvl_train.infer.generate import Generation, decode_answer, generate_batch

if TYPE_CHECKING:
    from qvl_data.encode import EncodedPrompt
    from qvl_data.format import ProcessorSummary

#: Rows encoded and sorted by length together: enough to batch similar lengths, few enough images in memory.
WINDOW_BATCHES = 8
#: The keys of every line of a predictions file, in order: how qvl recognizes a file it wrote.
PREDICTION_KEYS = ("id", "source", "index", "prompt", "reference", "prediction")
_FIRST_LINE_LIMIT = 1 << 24  # a prompt of a long multi-turn row is well under this

_VISION_SPAN = re.compile(
    re.escape(VISION_START_TOKEN) + f"(?:{re.escape(IMAGE_PAD_TOKEN)})*" + re.escape(VISION_END_TOKEN)
)


def prompt_text(tokenizer: Any, input_ids: list[int]) -> str:
    """The prompt as text, control tokens kept, each image span shown as ``<image>``."""
    return _VISION_SPAN.sub("<image>", tokenizer.decode(input_ids, skip_special_tokens=False))


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a predictions file qvl wrote (its first line holds exactly the keys of
    :data:`PREDICTION_KEYS`), or empty (what qvl writes for no rows, and nothing to lose)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(_FIRST_LINE_LIMIT)
    except OSError:
        return False
    if not first:
        return True
    try:
        line = json.loads(first)
    except ValueError:
        return False
    return isinstance(line, dict) and tuple(line) == PREDICTION_KEYS


def _progress(total: int, quiet: bool, label: str):
    """The bar over prompts: rows/s and generated tokens/s since the start, on stderr (stdout may be piped)."""
    from rich.console import Console

    from qvl_data.progress import rows_progress

    console = Console(stderr=True, highlight=False)
    return rows_progress(total, label, {"tokens": "tok/s"}, quiet=quiet, decimals=2, console=console)


def _windows(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    window: list[Any] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def predict(
    model: torch.nn.Module,
    prompts: Iterable[EncodedPrompt | Rejection],
    total: int,
    tokenizer: Any,
    processor: ProcessorSummary,
    generation: Generation,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    output: str | Path | None = None,
    quiet: bool = False,
    label: str = "predict",
    on_rejection: Callable[[Rejection], None] | None = None,
    references: Mapping[str, Any] | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """Answer every prompt; returns (and writes to ``output`` as JSON Lines, in input order) one dict per
    prompt: id, source, index, prompt (text, images as ``<image>``), reference, prediction. Rejected rows
    (an unreadable image, say) go to ``on_rejection`` and get no line. ``references`` (by id) replaces the
    prompts' own reference, e.g. a benchmark's list of human answers. The caller checks that ``output``
    may be replaced (:func:`qvl_data.files.refuse_foreign`).

    Under torchrun (``dist`` of several ranks) rank r answers rows r, r + world, ... (each row once, no
    padding rows); every rank gets back all lines and rejections in input order, and rank 0 alone writes
    ``output`` and shows progress, so the file is the one a single process writes (greedy decoding)."""
    dist = dist or Dist()
    if generation.do_sample:
        torch.manual_seed(generation.seed)
    share = len(range(dist.rank, total, dist.world_size))  # this rank's rows, for its progress bar
    progress, task = _progress(share, quiet or not dist.main, label)
    lines: list[tuple[int, dict[str, Any]]] = []
    rejections: list[tuple[int, Rejection]] = []
    tokens = 0  # generated, for the progress bar's rate
    writing = output is not None and dist.main
    with atomic_output(output) if writing else contextlib.nullcontext() as out_file, progress:
        for window in _windows(_rows_of_rank(prompts, dist), batch_size * WINDOW_BATCHES):
            ready = []
            for position, item in window:
                if isinstance(item, Rejection):
                    rejections.append((position, item))
                    progress.advance(task)
                else:
                    ready.append((position, item))
            answers: dict[int, str] = {}
            order = sorted(range(len(ready)), key=lambda k: len(ready[k][1].input_ids))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                generated = generate_batch(
                    model, [ready[k][1] for k in chunk], processor, generation, device, dtype
                )
                for k, ids in zip(chunk, generated, strict=True):
                    answers[k] = decode_answer(tokenizer, ids)
                tokens += sum(map(len, generated))
                progress.update(task, advance=len(chunk), tokens=tokens)
            for k, (position, item) in enumerate(ready):
                reference = references[item.id] if references is not None else item.reference
                values = (item.id, item.source, item.index, prompt_text(tokenizer, item.input_ids), reference)
                lines.append((position, dict(zip(PREDICTION_KEYS, (*values, answers[k]), strict=True))))
        if dist.world_size > 1:
            shares = dist.all_gather_object((lines, rejections))
            lines = sorted((pair for share, _ in shares for pair in share), key=lambda pair: pair[0])
            rejections = sorted((pair for _, share in shares for pair in share), key=lambda pair: pair[0])
        for _, rejection in rejections:
            if on_rejection is not None:
                on_rejection(rejection)
        results = [line for _, line in lines]
        if out_file is not None:
            for line in results:
                out_file.write(json.dumps(line, ensure_ascii=False) + "\n")
    return results


def _rows_of_rank(
    prompts: Iterable[EncodedPrompt | Rejection], dist: Dist
) -> Iterator[tuple[int, EncodedPrompt | Rejection]]:
    """(input position, prompt) of this rank's rows: every world_size-th row from its rank on (strided, so
    the ranks' shares differ by one row at most and hold similar lengths)."""
    for position, item in enumerate(prompts):
        if position % dist.world_size == dist.rank:
            yield position, item
