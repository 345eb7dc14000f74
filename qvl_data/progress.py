"""The progress of the long row-by-row jobs (build, validate, predict): rows done of all, and rates.

On a terminal it is a rich bar. Off one (a log file, nohup, CI, a batch scheduler) a bar would print
nothing until the end, so it is a plain line every ``PLAIN_INTERVAL_S`` seconds and one at the end.
The rates are counts over the time since the start, not rich's short-window estimate, which jumps when a
whole partition (or batch) of rows lands at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

#: Seconds between two plain progress lines off a terminal (QVL_PROGRESS_INTERVAL overrides it).
PLAIN_INTERVAL_S = 10.0


def rates_text(task: Any, counters: dict[str, str], decimals: int = 1) -> str:
    """``"12.3 rows/s 4.5 img/s"``: the task's rows and each ``counters`` field per second so far."""
    elapsed = task.finished_time if task.finished else task.elapsed
    if not elapsed or not task.completed:
        return ""
    rates = [f"{task.completed / elapsed:,.{decimals}f} rows/s"]
    rates += [f"{task.fields.get(field, 0) / elapsed:,.1f} {unit}" for field, unit in counters.items()]
    return " ".join(rates)


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plain_line(task: Any, label: str, counters: dict[str, str], decimals: int = 1) -> str:
    """One progress line without a bar: ``building 512/1,096 rows (47%), 102.3 rows/s, elapsed 0:00:05,
    eta 0:00:06``."""
    total = task.total or 0
    percent = f" ({100 * task.completed / total:.0f}%)" if total else ""
    parts = [f"{label} {int(task.completed):,}/{int(total):,} rows{percent}"]
    rates = rates_text(task, counters, decimals)
    if rates:
        parts.append(rates.replace(" rows/s ", " rows/s, ").replace("/s ", "/s, "))
    elapsed = task.finished_time if task.finished else task.elapsed
    parts.append(f"elapsed {hms(elapsed or 0)}")
    if task.completed and total and not task.finished:
        parts.append(f"eta {hms((elapsed or 0) / task.completed * (total - task.completed))}")
    return ", ".join(parts)


def rows_progress(
    total: int,
    label: str,
    counters: dict[str, str],
    quiet: bool = False,
    decimals: int = 1,
    console: Any = None,
    get_time: Callable[[], float] | None = None,
) -> tuple[Any, Any]:
    """``(progress, task)``: progress over ``total`` rows showing rows/s and, for each ``counters`` item
    ``field: unit``, the task field ``field`` per second as ``unit`` (advance it with
    ``progress.update(task, advance=rows, field=value)``). ``decimals``: of the rows/s figure. A rich bar
    on a terminal, plain lines at a steady interval elsewhere (see the module docstring)."""
    from rich.console import Console
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
            return rates_text(task, counters, decimals) or super().render(task)

    class PlainLines(Progress):
        """No live display; a :func:`plain_line` every interval while rows come in, and one at the end."""

        def __init__(self, interval: float, **kwargs: Any) -> None:
            super().__init__(disable=True, **kwargs)
            self._interval = interval
            self._printed: dict[Any, tuple[float, float]] = {}  # task -> (time, rows) of its last line

        def update(self, task_id: Any, **kwargs: Any) -> None:  # type: ignore[override]
            super().update(task_id, **kwargs)
            task, now = self._tasks[task_id], self.get_time()
            started = task.start_time if task.start_time is not None else now
            if now - self._printed.get(task_id, (started, 0.0))[0] >= self._interval:
                self._print(task)

        def _print(self, task: Any) -> None:
            self._printed[task.id] = (self.get_time(), task.completed)
            self.console.print(plain_line(task, label, counters, decimals), soft_wrap=True)

        def stop(self) -> None:
            for task in self.tasks:
                if task.completed and not task.finished:
                    task.finished_time = task.elapsed
            super().stop()
            for task in self.tasks:  # the last line, unless the last update printed it
                if task.completed and self._printed.get(task.id, (0.0, 0.0))[1] != task.completed:
                    self._print(task)

    console = console or Console()
    if not quiet and not console.is_terminal:
        interval = float(os.environ.get("QVL_PROGRESS_INTERVAL", PLAIN_INTERVAL_S))
        progress: Progress = PlainLines(interval, console=console, get_time=get_time)
    else:
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
