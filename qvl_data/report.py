"""Rich summaries printed after a build or a validation run, and the rejected-rows files written beside."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qvl_data.files import refuse_foreign, write_atomic
from qvl_data.schema import REASONS, Rejection, rejection_line

_REJECTION_KEYS = {"source", "index", "reason", "message"}


def is_rejection_list(path: Path) -> bool:
    """Whether ``path`` is a list of rejected rows as qvl writes them (``rejection_line``): empty, or its
    first line one such object. Only such a file may be replaced by a later run."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first:
        return True  # the report of a run without rejected rows
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and _REJECTION_KEYS <= set(row)


def write_rejection_list(path: Path, rejections: list[Rejection], option: str = "--report") -> None:
    """``rejections`` as JSON Lines at ``path``, atomically; an existing file that is not an earlier
    rejection list is refused (``option`` names it in the message)."""
    path = Path(path)
    refuse_foreign(path, is_rejection_list, "rejected-rows list", option)
    write_atomic(path, lambda f: f.writelines(rejection_line(r).encode("utf-8") for r in rejections))


# manifest key -> column heading
SUMMARY_COLUMNS = {
    "rows": "rows",
    "tokens": "tokens",
    "trained_tokens": "trained",
    "image_tokens": "img tok",
    "max_length": "max",
    "truncated": "cut",
    "rejected": "rejected",
}


def print_build_summary(result, title: str = "build", console: Console | None = None) -> None:
    console = console or Console()
    for problem in getattr(result, "repaired", ()):  # a build's, not a validation's
        console.print(Text(f"repaired: {problem}; its partition was redone"), soft_wrap=True)
    manifest = result.manifest
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"qvl-data {title}: {result.out_dir}" if title == "build" else f"qvl-data {title}",
    )
    table.add_column("source", no_wrap=True, min_width=max(map(len, manifest.sources), default=6))
    for heading in SUMMARY_COLUMNS.values():
        table.add_column(heading, justify="right", no_wrap=True)
    for name, s in manifest.sources.items():
        table.add_row(name, *(f"{getattr(s, k):,}" for k in SUMMARY_COLUMNS))
    t = manifest.totals
    table.add_row("[bold]total", *(f"[bold]{getattr(t, k):,}" for k in SUMMARY_COLUMNS))
    console.print(table)
    by_reason = manifest.rejected.by_reason
    if by_reason:
        reasons = Table(box=box.SIMPLE_HEAD, title="rejected rows by reason")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        reasons.add_column("meaning")
        for reason, n in by_reason.items():
            reasons.add_row(reason, str(n), REASONS[reason])
        console.print(reasons)
    shards = manifest.shards
    if shards:
        size = sum(s.bytes for s in shards)
        console.print(
            f"{len(shards)} shard(s), {size / 2**20:,.1f} MiB, {manifest.pixel_format} pixels; "
            f"{result.seconds:.1f} s; rejected rows listed in {result.out_dir / 'rejected.jsonl'}"
        )


def print_rejections(rejections: list[Rejection], limit: int = 50, console: Console | None = None) -> None:
    console = console or Console()
    for r in rejections[:limit]:
        # One line per row whatever the width, so the output can be grepped; markup off: messages quote
        # user text, which may contain [brackets].
        console.print(Text.assemble((r.reason, "red"), " ", r.message), highlight=False, soft_wrap=True)
    if len(rejections) > limit:
        console.print(f"... and {len(rejections) - limit} more (use --report FILE for all)")
