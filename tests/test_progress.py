"""Progress of the long jobs: a bar on a terminal, plain lines at a steady interval off one."""

from __future__ import annotations

import io

from rich.console import Console

from qvl_data.progress import rows_progress


def _run(terminal: bool, steps: int = 10, seconds_per_step: float = 4.0, quiet: bool = False) -> str:
    clock = [100.0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80)
    progress, task = rows_progress(
        1000, "building", {"images": "img/s"}, quiet=quiet, console=console, get_time=lambda: clock[0]
    )
    with progress:
        for step in range(steps):
            clock[0] += seconds_per_step
            progress.update(task, advance=1000 // steps, images=(step + 1) * 5)
    return out.getvalue()


def test_off_a_terminal_a_plain_line_every_interval_and_one_at_the_end():
    lines = _run(terminal=False).splitlines()
    assert lines == [
        "building 300/1,000 rows (30%), 25.0 rows/s, 1.2 img/s, elapsed 0:00:12, eta 0:00:28",
        "building 600/1,000 rows (60%), 25.0 rows/s, 1.2 img/s, elapsed 0:00:24, eta 0:00:16",
        "building 900/1,000 rows (90%), 25.0 rows/s, 1.2 img/s, elapsed 0:00:36, eta 0:00:04",
        "building 1,000/1,000 rows (100%), 25.0 rows/s, 1.2 img/s, elapsed 0:00:40",
    ]


def test_the_last_line_is_not_printed_twice():
    # the last update is itself 12 s after the line before: it prints, and the end adds nothing
    lines = _run(terminal=False, steps=5, seconds_per_step=12.0).splitlines()
    assert len(lines) == 5 and lines[-1].startswith("building 1,000/1,000 rows (100%)")


def test_quiet_prints_nothing_on_or_off_a_terminal():
    assert _run(terminal=False, quiet=True) == ""
    assert _run(terminal=True, quiet=True) == ""


def test_on_a_terminal_the_bar_shows_the_rates():
    assert "25.0 rows/s 1.2 img/s" in _run(terminal=True)
