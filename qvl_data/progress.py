"""The progress bar of the long row-by-row jobs (build, validate, predict): rows done of all, and rates.

The rates are counts over the time since the start, not rich's short-window estimate, which jumps when a
whole partition (or batch) of rows lands at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def rows_progress(
    total: int,
    label: str,
    counters: dict[str, str],
    quiet: bool = False,
    decimals: int = 1,
    console: Any = None,
    get_time: Callable[[], float] | None = None,
) -> tuple[Any, Any]:
    """``(progress, task)``: a rich bar over ``total`` rows showing rows/s and, for each ``counters`` item
    ``field: unit``, the task field ``field`` per second as ``unit`` (advance it with
    ``progress.update(task, advance=rows, field=value)``). ``decimals``: of the rows/s figure."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class Rates(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[override]
            elapsed = task.finished_time if task.finished else task.elapsed
            if not elapsed or not task.completed:
                return super().render(task)
            rates = [f"{task.completed / elapsed:,.{decimals}f} rows/s"]
            rates += [
                f"{task.fields.get(field, 0) / elapsed:,.1f} {unit}" for field, unit in counters.items()
            ]
            return " ".join(rates)

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rates(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        get_time=get_time,
    )
    return progress, progress.add_task(label, total=total, **dict.fromkeys(counters, 0))
