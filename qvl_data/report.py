"""Rich summaries printed after a build or a validation run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qvl_data.schema import REASONS, Rejection


def print_build_summary(result, title: str = "build", console: Console | None = None) -> None:
    console = console or Console()
    manifest = result.manifest
    table = Table(title=f"qvl-data {title}: {result.out_dir}" if title == "build" else f"qvl-data {title}")
    for col in ("source", "rows", "tokens", "trained", "image tokens", "max len", "truncated", "rejected"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, s in manifest["sources"].items():
        table.add_row(
            name,
            *(
                f"{s[k]:,}"
                for k in (
                    "rows",
                    "tokens",
                    "trained_tokens",
                    "image_tokens",
                    "max_length",
                    "truncated",
                    "rejected",
                )
            ),
        )
    t = manifest["totals"]
    table.add_row(
        "[bold]total",
        *(
            f"[bold]{t[k]:,}"
            for k in (
                "rows",
                "tokens",
                "trained_tokens",
                "image_tokens",
                "max_length",
                "truncated",
                "rejected",
            )
        ),
    )
    console.print(table)
    by_reason = manifest["rejected"]["by_reason"]
    if by_reason:
        reasons = Table(title="rejected rows by reason")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        reasons.add_column("meaning")
        for reason, n in by_reason.items():
            reasons.add_row(reason, str(n), REASONS[reason])
        console.print(reasons)
    shards = manifest.get("shards") or []
    if shards:
        size = sum(s["bytes"] for s in shards)
        console.print(
            f"{len(shards)} shard(s), {size / 2**20:,.1f} MiB, {manifest['options']['pixel_format']} pixels; "
            f"{result.seconds:.1f} s; rejected rows listed in {result.out_dir / 'rejected.jsonl'}"
        )


def print_rejections(rejections: list[Rejection], limit: int = 50, console: Console | None = None) -> None:
    console = console or Console()
    for r in rejections[:limit]:
        console.print(f"[red]{r.reason}[/red] {r.message}", highlight=False)
    if len(rejections) > limit:
        console.print(f"... and {len(rejections) - limit} more (use --report FILE for all)")
