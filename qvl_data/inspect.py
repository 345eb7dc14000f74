"""Row-by-row views of a shard directory: exactly which tokens are trained and where the images sit.

``qvl-data inspect`` renders each row as a rich panel: a header (source, index, length, trained tokens,
truncation, images with their grid, token count and sizes) and the decoded conversation. Trained text is
wrapped in ``⟦…⟧`` (and highlighted when colour is on), masked text is dim, special tokens stay visible,
and each ``<|vision_start|><|image_pad|>×n<|vision_end|>`` span collapses to one badge
``[image 1 · 12×22 patches · 66 tokens]``. The markers are plain characters, so the distinction survives
pipes, ``--no-color`` and tests. A trained line break is shown as ``↵`` before the closing marker.

Everything here reads the manifest, ``rejected.jsonl`` and the memory-mapped shards only; pixels are
touched only by :func:`row_images` (the notebook's image view).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.containers import Lines
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from qvl_data.errors import QvlError
from qvl_data.format import Manifest, ProcessorSummary
from qvl_data.processor import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from qvl_data.schema import REASONS
from qvl_data.shards import REJECTED, ShardSet
from qvl_data.template import IGNORE_INDEX
from qvl_data.vision import image_token_count, patches_to_image

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
NEWLINE_MARK = "↵"

LEGEND = (
    f"{TRAINED_OPEN}trained{TRAINED_CLOSE} text is what the loss sees (labels = ids); text outside the "
    f"markers is masked (-100). {NEWLINE_MARK} = a trained line break. "
    "[image k · h×w patches · n tokens] = <|vision_start|> + n × <|image_pad|> + <|vision_end|>."
)

STYLE_MASKED = "dim"
STYLE_TRAINED = "bold green"
STYLE_MARKER = "green"
STYLE_SPECIAL = "cyan"
STYLE_IMAGE = "bold magenta"
STYLE_WARN = "bold red"


# ---------------------------------------------------------------------------------------------- opening


def open_shards(out_dir: str | Path) -> ShardSet:
    """The memory-mapped rows of a build; a one-line QvlError for a missing, foreign or broken directory."""
    try:
        return ShardSet(Path(out_dir))
    except (OSError, pa.ArrowInvalid) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvlError(f"{out_dir}: unreadable shard ({first_line})") from None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model: str | None):
    from qvl_data.processor import load_tokenizer

    return load_tokenizer(model)


def manifest_tokenizer(manifest: Manifest):
    """The tokenizer the build used: the manifest's processor ``model`` ("embedded" -> the built-in one)."""
    model = manifest.processor.model
    try:
        return _load_tokenizer(None if model in (None, "embedded") else str(model))
    except QvlError:
        raise
    except Exception as e:  # a checkpoint path that moved, no network for a hub id, ...
        raise QvlError(f"cannot load the tokenizer {model!r} recorded in the manifest: {e}") from None


# ---------------------------------------------------------------------------------------------- selecting


def parse_index(spec: str) -> tuple[str, int]:
    """``"source:index"`` -> (source, index)."""
    source, sep, index = spec.rpartition(":")
    if not sep or not source or not index.strip().lstrip("-").isdigit():
        raise QvlError(f"--index expects SOURCE:INDEX (e.g. mllm_demo:0), got {spec!r}")
    return source, int(index)


def _check_source(shards: ShardSet, source: str) -> None:
    known = list(shards.manifest.sources)
    if source not in known:
        raise QvlError(f"unknown source {source!r}; this build has: {', '.join(known)}")


def rows_of_source(shards: ShardSet, source: str | None) -> Sequence[int]:
    """Global row numbers of ``source`` (all rows for None), reading only the ``source`` column."""
    if source is None:
        return range(len(shards))
    _check_source(shards, source)
    rows: list[int] = []
    for base, table in zip(shards.offsets[:-1], shards.tables, strict=True):
        hits = np.nonzero(table.column("source").to_numpy(zero_copy_only=False) == source)[0]
        rows.extend(int(base) + int(h) for h in hits)
    return rows


def read_rejected(out_dir: str | Path) -> list[dict]:
    """The rows of ``rejected.jsonl`` (source, index, reason, message, file)."""
    path = Path(out_dir) / REJECTED
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QvlError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return rows


def find_row(shards: ShardSet, source: str, index: int) -> int:
    """Global row number of ``source:index``; a QvlError saying why when it is not in the shards."""
    _check_source(shards, source)
    try:
        return shards.find(source, index)
    except KeyError:
        for r in read_rejected(shards.out_dir):
            if r.get("source") == source and r.get("index") == index:
                raise QvlError(
                    f"{source}:{index} was rejected ({r.get('reason')}): {r.get('message')}"
                ) from None
        raise QvlError(f"{source}:{index} is not in {shards.out_dir}") from None


def select_rows(
    shards: ShardSet,
    indices: Sequence[str] = (),
    sample: int | None = None,
    seed: int = 0,
    source: str | None = None,
) -> list[int]:
    """Row numbers to show: the ``--index`` rows in the order given, then ``sample`` random rows.

    The sample is drawn with ``random.Random(seed)`` from the rows of ``source`` (or all rows), so the
    same seed shows the same rows; it is listed in row order. With neither, 3 random rows.
    """
    chosen = [find_row(shards, *parse_index(spec)) for spec in indices]
    if sample is None and not indices:
        sample = 3
    if sample:
        if sample < 0:
            raise QvlError("--sample must be positive")
        pool = rows_of_source(shards, source)
        if chosen:
            shown = set(chosen)
            pool = [i for i in pool if i not in shown]
        if not pool and not chosen:
            raise QvlError(f"no rows to sample{f' in source {source!r}' if source else ''}")
        chosen += sorted(random.Random(seed).sample(pool, min(sample, len(pool))))
    return chosen


# ---------------------------------------------------------------------------------------------- spans


@dataclass
class Piece:
    """A stretch of tokens shown as one unit: decoded text, one special token, or one image badge."""

    kind: Literal["text", "special", "image"]
    start: int  # token positions [start, end)
    end: int
    text: str = ""  # decoded text, or the badge for an image
    image: int | None = None  # 0-based image number of an image piece
    tokens: int = 0  # image: tokens the grid implies (image_token_count)
    mismatch: bool = False  # image: the span's pad count differs from the grid's


@dataclass
class Run:
    """Consecutive pieces that are all trained or all masked."""

    trained: bool
    pieces: list[Piece] = field(default_factory=list)


def _image_end(input_ids: Sequence[int], i: int) -> int | None:
    """End (exclusive) of the vision span starting at ``i``, or None if no well-formed span starts there."""
    if input_ids[i] != VISION_START_ID:
        return None
    j = i + 1
    while j < len(input_ids) and input_ids[j] == IMAGE_PAD_ID:
        j += 1
    if j > i + 1 and j < len(input_ids) and input_ids[j] == VISION_END_ID:
        return j + 1
    return None


def image_badge(k: int, grid: Sequence[int] | None, merge_size: int, pads: int) -> tuple[str, int, bool]:
    """``[image k · h×w patches · n tokens]`` for the k-th image (0-based), n from ``image_token_count``."""
    if grid is None:
        return f"[image {k + 1} · no grid stored · {pads} tokens]", pads, True
    t, h, w = (int(x) for x in grid)
    n = image_token_count((t, h, w), merge_size)
    shape = f"{h}×{w}" if t == 1 else f"{t}×{h}×{w}"
    warn = "" if n == pads else f" ≠ {pads} in the text"
    return f"[image {k + 1} · {shape} patches · {n} tokens{warn}]", n, n != pads


def conversation_runs(
    input_ids: Sequence[int],
    labels: Sequence[int],
    decode: Callable[[list[int]], str],
    special_ids: set[int],
    grids: Sequence[Sequence[int]] = (),
    merge_size: int = 2,
) -> list[Run]:
    """Group a row's tokens into trained / masked runs of decoded pieces.

    Each vision span becomes one image piece; each special token its own piece (so it stays visible and
    can be styled); the tokens between are decoded together, never across a trained/masked boundary.
    """
    units: list[tuple[int, int, bool]] = []  # (start, end, is_image)
    i = 0
    while i < len(input_ids):
        end = _image_end(input_ids, i)
        units.append((i, end or i + 1, end is not None))
        i = end or i + 1

    runs: list[Run] = []
    images = 0
    for start, end, is_image in units:
        trained = any(label != IGNORE_INDEX for label in labels[start:end])
        if not runs or runs[-1].trained != trained:
            runs.append(Run(trained))
        pieces = runs[-1].pieces
        if is_image:
            grid = grids[images] if images < len(grids) else None
            badge, n, mismatch = image_badge(images, grid, merge_size, end - start - 2)
            pieces.append(Piece("image", start, end, badge, images, n, mismatch))
            images += 1
        elif input_ids[start] in special_ids:
            pieces.append(Piece("special", start, end))
        elif pieces and pieces[-1].kind == "text":
            pieces[-1].end = end
        else:
            pieces.append(Piece("text", start, end))
    for run in runs:
        for piece in run.pieces:
            if piece.kind != "image":
                piece.text = decode(list(input_ids[piece.start : piece.end]))
    return runs


class UnbrokenTokensText(Text):
    """Text whose ``unbroken`` spans (the control tokens, image badges) are never split across two lines.

    rich folds a word longer than the line (a run of CJK text has no spaces) at any character, which can cut
    ``<|im_end|>`` into ``<|im_e`` and ``nd|>``; here a line break that would fall inside such a span
    moves to its start (or, for a span at the start of a line, to its end)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unbroken: list[tuple[int, int]] = []

    def append_unbroken(self, text: str, style: str) -> None:
        start = len(self)
        self.append(text, style)
        self.unbroken.append((start, len(self)))

    def wrap(  # type: ignore[override]
        self, console: Console, width: int, *, justify: Any = None, overflow: Any = None, **kwargs: Any
    ) -> Lines:
        """rich's word wrap (its own steps: divide, strip, justify, truncate) with these break points."""
        justify, overflow = justify or self.justify or "default", overflow or self.overflow or "fold"
        lines, line_start = Lines(), 0
        for line in self.split(allow_blank=True):
            spans = [(max(a - line_start, 0), min(b - line_start, len(line))) for a, b in self.unbroken]
            spans = [(a, b) for a, b in spans if a < b]
            new_lines = line.divide(break_offsets(line.plain, width, spans))
            for new_line in new_lines:
                new_line.rstrip_end(width)
            new_lines.justify(console, width, justify=justify, overflow=overflow)
            for new_line in new_lines:
                new_line.truncate(width, overflow=overflow)
            lines.extend(new_lines)
            line_start += len(line) + 1  # split() drops the "\n"
        return lines


def break_offsets(text: str, width: int, unbroken: list[tuple[int, int]]) -> list[int]:
    """Where a line of ``text`` breaks to fit ``width`` cells: greedily after whole words (runs of
    non-space with their trailing spaces) and around ``unbroken`` spans; a word wider than the line is
    folded at characters, a span only when it alone is wider than the line."""
    units, pos = [], 0
    for a, b in sorted(unbroken):
        units += [(pos + m.start(), pos + m.end()) for m in re.finditer(r"\s*\S+\s*", text[pos:a])]
        units.append((a, b))
        pos = b
    units += [(pos + m.start(), pos + m.end()) for m in re.finditer(r"\s*\S+\s*|\s+", text[pos:])]
    offsets: list[int] = []
    used = 0  # cells on the current line
    for start, end in units:
        if used and used + cell_len(text[start:end].rstrip()) > width:
            offsets.append(start)
            used = 0
        for k in range(start, end):  # character by character: a fold only where the unit is wider than a line
            cells = cell_len(text[k])
            if used and used + cells > width and not text[k].isspace():
                offsets.append(k)
                used = 0
            used += cells
    return offsets


def runs_to_text(runs: list[Run]) -> Text:
    """The conversation as styled rich Text (markers always present, styles dropped without colour)."""
    out = UnbrokenTokensText()
    for run in runs:
        if run.trained:
            out.append(TRAINED_OPEN, STYLE_MARKER)
        trailing = 0
        for n, piece in enumerate(run.pieces):
            text = piece.text
            if run.trained and n == len(run.pieces) - 1 and piece.kind == "text":
                stripped = text.rstrip("\n")
                trailing, text = len(text) - len(stripped), stripped
            if piece.kind == "image":
                style = STYLE_WARN if piece.mismatch else STYLE_IMAGE
            elif piece.kind == "special":
                style = f"{STYLE_SPECIAL} bold" if run.trained else f"{STYLE_SPECIAL} dim"
            else:
                style = STYLE_TRAINED if run.trained else STYLE_MASKED
            if piece.kind == "text":
                out.append(text, style)
            else:
                out.append_unbroken(text, style)
        if run.trained:
            out.append(NEWLINE_MARK * trailing, STYLE_TRAINED)
            out.append(TRAINED_CLOSE, STYLE_MARKER)
            out.append("\n" * trailing)
    out.rstrip()
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _size(w: int, h: int) -> str:
    return f"{w}×{h}"


def row_header(row: dict, row_number: int, total_rows: int, manifest: Manifest) -> RenderableType:
    """Length, trained tokens, truncation, then a small table of the images (grid, tokens, sizes)."""
    merge, patch = manifest.geometry.merge_size, manifest.geometry.patch_size
    length, trained = row["length"], row["trained_tokens"]
    ratio = trained / length if length else 0.0
    grids = row.get("image_grid_thw") or []
    head = Text()
    head.append(f"row {row_number} of {total_rows} · length {length} · ")
    head.append(f"trained {trained} ({ratio:.1%})", STYLE_TRAINED)
    head.append(" · truncated ")
    head.append("YES", STYLE_WARN) if row["truncated"] else head.append("no")
    head.append(f" · images {len(grids)}")
    if not grids:
        return head
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="dim", padding=(0, 2, 0, 0))
    for name in ("image", "grid t×h×w", "tokens", "original", "resized", "processed", "file"):
        table.add_column(name, justify="left" if name in ("image", "file") else "right")
    sizes = row.get("image_sizes") or []
    files = row.get("images") or []
    for k, grid in enumerate(grids):
        t, h, w = (int(x) for x in grid)
        ow, oh, rw, rh = sizes[k] if k < len(sizes) else ("?",) * 4
        table.add_row(
            f"image {k + 1}",
            f"{t}×{h}×{w}",
            str(image_token_count(grid, merge)),
            _size(ow, oh),
            _size(rw, rh),
            _size(w * patch, h * patch),
            Path(files[k]).name if k < len(files) else "",
        )
    return Group(head, table)


def _token_repr(text: str) -> str:
    return repr(text)


def token_table(
    input_ids: Sequence[int], labels: Sequence[int], tokenizer, title: str | None = None
) -> Table:
    """position, id, token text, label; each run of ``<|image_pad|>`` is one line (``×n``)."""
    table = Table(
        title=title, box=None, pad_edge=False, show_edge=False, header_style="bold", title_justify="left"
    )
    for name in ("pos", "id", "token", "label"):
        table.add_column(name, justify="right" if name in ("pos", "id", "label") else "left")
    i = 0
    while i < len(input_ids):
        tid, label = int(input_ids[i]), int(labels[i])
        j = i + 1
        if tid == IMAGE_PAD_ID:
            while j < len(input_ids) and input_ids[j] == IMAGE_PAD_ID and labels[j] == label:
                j += 1
        token = _token_repr(tokenizer.decode([tid], skip_special_tokens=False))
        pos = str(i) if j == i + 1 else f"{i}-{j - 1}"
        if j > i + 1:
            token += f" ×{j - i}"
        trained = label != IGNORE_INDEX
        table.add_row(pos, str(tid), token, str(label), style=STYLE_TRAINED if trained else STYLE_MASKED)
        i = j
    return table


def render_row(shards: ShardSet, i: int, tokenizer, tokens: bool = False) -> RenderableType:
    """One row as a panel (header, decoded conversation) plus, with ``tokens``, the per-token table."""
    row = shards.row(i)
    merge = shards.manifest.geometry.merge_size
    runs = conversation_runs(
        row["input_ids"],
        row["labels"],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        set(tokenizer.all_special_ids),
        row.get("image_grid_thw") or [],
        merge,
    )
    body = Group(row_header(row, i, len(shards), shards.manifest), Text(""), runs_to_text(runs))
    panel = Panel(
        body, title=Text(f"{row['source']}:{row['index']}", "bold"), title_align="left", expand=True
    )
    if not tokens:
        return panel
    title = f"tokens of {row['source']}:{row['index']} (label -100 = masked)"
    return Group(panel, token_table(row["input_ids"], row["labels"], tokenizer, title))


def rejected_table(rejected: list[dict], source: str | None = None) -> Table:
    rows = [r for r in rejected if source is None or r.get("source") == source]
    table = Table(title=f"{len(rows)} rejected row(s)", title_justify="left")
    for name in ("source", "index", "reason", "message"):
        table.add_column(name, justify="right" if name == "index" else "left", overflow="fold")
    for r in rows:
        cells = (r.get("source"), r.get("index"), r.get("reason"), r.get("message"))
        table.add_row(*(Text(str(c)) for c in cells))  # Text: no markup from file names or messages
    return table


def make_console(color: bool | None = None, file: Any = None, width: int | None = None) -> Console:
    """A console that writes plain text when not a TTY (or ``color=False``) and colour on a terminal."""
    if color is False:
        return Console(file=file, no_color=True, highlight=False, width=width, force_terminal=False)
    return Console(file=file, highlight=False, width=width, force_terminal=True if color else None)


def inspect_rows(
    out_dir: str | Path,
    indices: Sequence[str] = (),
    sample: int | None = None,
    seed: int = 0,
    source: str | None = None,
    tokens: bool = False,
    rejected: bool = False,
    console: Console | None = None,
) -> None:
    """What ``qvl-data inspect`` prints."""
    console = console or make_console()
    shards = open_shards(out_dir)
    if rejected:
        if source is not None:
            _check_source(shards, source)
        rows = read_rejected(out_dir)
        by_reason: dict[str, int] = {}
        for r in rows:
            if source is None or r.get("source") == source:
                by_reason[r.get("reason", "?")] = by_reason.get(r.get("reason", "?"), 0) + 1
        console.print(rejected_table(rows, source))
        for reason, n in sorted(by_reason.items()):
            console.print(Text(f"{reason}: {n} · {REASONS.get(reason, 'unknown reason')}"))
        if not (indices or sample):
            return
    chosen = select_rows(shards, indices, sample, seed, source)
    tokenizer = manifest_tokenizer(shards.manifest)
    console.print(Text(LEGEND, style="dim"))
    for i in chosen:
        console.print(render_row(shards, i, tokenizer, tokens=tokens))


# ---------------------------------------------------------------------------------------------- pixels


def unnormalize_patches(patches: np.ndarray, processor: ProcessorSummary) -> np.ndarray:
    """float32 ``pixel_values`` (n, 3·T·p·p) -> the uint8 values (n, 3·p·p) before rescale/normalize."""
    temporal = processor.temporal_patch_size
    n, dim = patches.shape
    per_t = patches.reshape(n, 3, temporal, dim // (3 * temporal))[:, :, 0, :]
    mean = np.asarray(processor.image_mean, dtype=np.float64)[None, :, None]
    std = np.asarray(processor.image_std, dtype=np.float64)[None, :, None]
    values = (per_t.astype(np.float64) * std + mean) / processor.rescale_factor
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(n, -1)


def row_images(shards: ShardSet, i: int) -> list[np.ndarray]:
    """The images of row ``i`` rebuilt from the stored pixels: (H, W, 3) uint8 RGB, H = grid_h·patch."""
    row = shards.row(i, columns=("image_grid_thw",))
    grids = row["image_grid_thw"] or []
    if not grids:
        return []
    proc = shards.manifest.processor
    patches = shards.pixel_patches(i)
    if shards.pixel_format == "float32":
        patches = unnormalize_patches(patches, proc)
    merge, patch = proc.merge_size, proc.patch_size
    images, offset = [], 0
    for grid in grids:
        n = int(np.prod(grid))
        images.append(
            patches_to_image(patches[offset : offset + n], grid, merge_size=merge, patch_size=patch)
        )
        offset += n
    return images
