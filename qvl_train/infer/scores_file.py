"""What ``qvl-train score`` reports: the metrics of each task, the table (one column per model or file,
with its difference to the first) and ``scores.json`` (the same numbers, with what was scored and how).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvl_train.infer.files import atomic_output

METRICS = {
    "instruct": ("exact_match", "bleu-4", "rouge-l"),
    "okvqa": ("vqa_accuracy",),
    "coco": ("bleu-4", "meteor", "rouge-l", "cider"),
}
SCORES_FILE = "scores.json"
#: The keys every scores.json qvl writes starts with: how qvl recognizes one it wrote.
SCORES_KEYS = ("task", "metrics", "scale", "data", "files", "rows", "models")
_SCORES_LIMIT = 1 << 26


def is_scores_file(path: Path) -> bool:
    """Whether ``path`` is a scores.json qvl wrote: a JSON object whose keys start with :data:`SCORES_KEYS`."""
    try:
        if path.stat().st_size > _SCORES_LIMIT:
            return False
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and tuple(content)[: len(SCORES_KEYS)] == SCORES_KEYS


def _format(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "skipped"
    if base is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({value - base:+.2f})"


def score_table(task: str, names: list[str], scores: list[dict[str, Any]]):
    """A rich table: one row per metric, one column per model (or file), each after the first with its
    difference to the first (the base model)."""
    from rich.table import Table

    table = Table(title=f"{task} (x100)")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for metric in METRICS[task]:
        base = scores[0].get(metric)
        cells = [_format(base)] + [_format(s.get(metric), base) for s in scores[1:]]
        table.add_row(metric, *cells)
    return table


def write_scores(path: Path, report: dict[str, Any]) -> None:
    """``scores.json``, complete or not at all (its keys start with :data:`SCORES_KEYS`)."""
    if tuple(report)[: len(SCORES_KEYS)] != SCORES_KEYS:
        raise ValueError("a scores report starts with SCORES_KEYS")
    with atomic_output(path) as f:
        f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
