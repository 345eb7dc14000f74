"""Predictions made elsewhere (vLLM, SGLang, another toolkit), read for ``qvl-train score --predictions``.

Accepted formats, recognized per entry:

* the official result formats: ``[{"question_id", "answer"}]`` for OK-VQA / VQA (what the EvalAI server
  takes) and ``[{"image_id", "caption"}]`` for COCO captions (what ``COCO.loadRes`` takes);
* qvl's predictions file (``qvl-train predict`` / ``score``): JSON Lines of ``{"id", ..., "reference",
  "prediction"}``, the only format for instruction data, whose references are the file's own.

A file is a JSON array or JSON Lines (one object per line). A benchmark file must answer every question
(image) scored, once; answers to questions outside the benchmark are an error unless ``--max-rows``
scores a part of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvl_data.errors import QvlError
from qvl_train.infer.files import require_regular_file

if TYPE_CHECKING:
    from qvl_train.infer.benchmarks import Benchmark

#: Per task: the official result format's (key field, answer field) and how its key names a record.
OFFICIAL_FIELDS = {"okvqa": ("question_id", "answer"), "coco": ("image_id", "caption")}


def read_entries(path: str | Path) -> list[Any]:
    """The entries of a predictions file: a JSON array, or JSON Lines (blank lines skipped)."""
    path = require_regular_file(path, "predictions file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QvlError(f"{path}: cannot read the predictions file ({e})") from None
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise QvlError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QvlError(f"{path}:{number}:{e.colno}: invalid JSON: {e.msg}") from None
    if not entries:
        raise QvlError(f"{path}: no predictions in the file")
    return entries


def _text(entry: dict, name: str, path: Path, k: int) -> str:
    value = entry.get(name)
    if not isinstance(value, str):
        raise QvlError(f"{path}: entry {k} field {name!r} is {type(value).__name__}, not a string")
    return value


def instruct_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """(predictions, references) of a qvl predictions file, in file order."""
    path = Path(path)
    predictions, references = [], []
    for k, entry in enumerate(read_entries(path)):
        if not isinstance(entry, dict) or "prediction" not in entry or "reference" not in entry:
            raise QvlError(
                f"{path}: entry {k} is not a line of a qvl predictions file (prediction and reference); "
                "instruction data is scored from qvl's format only"
            )
        predictions.append(_text(entry, "prediction", path, k))
        references.append(_text(entry, "reference", path, k))
    return predictions, references


def benchmark_predictions(path: str | Path, benchmark: Benchmark, partial: bool = False) -> dict[str, str]:
    """Record id -> predicted answer (caption) for every record of ``benchmark``, from the official result
    format or qvl's; ``partial``: the benchmark is a part (``--max-rows``), other answers are ignored."""
    path = Path(path)
    key_field, answer_field = OFFICIAL_FIELDS[benchmark.task]
    answers: dict[str, str] = {}
    for k, entry in enumerate(read_entries(path)):
        if isinstance(entry, dict) and key_field in entry:
            key, answer = (
                f"{benchmark.task}:{_official_key(entry[key_field], key_field, path, k)}",
                answer_field,
            )
        elif isinstance(entry, dict) and "id" in entry and "prediction" in entry:
            key, answer = str(entry["id"]), "prediction"
        else:
            raise QvlError(
                f"{path}: entry {k} has neither {key_field!r} and {answer_field!r} (the official result "
                "format) nor 'id' and 'prediction' (qvl's predictions file)"
            )
        if key in answers:
            raise QvlError(f"{path}: entry {k} answers {key} a second time")
        answers[key] = _text(entry, answer, path, k)
    missing = [key for key in benchmark.references if key not in answers]
    if missing:
        raise QvlError(
            f"{path}: no prediction for {len(missing)} of {len(benchmark.references)} "
            f"{'questions' if benchmark.task == 'okvqa' else 'images'}, e.g. {missing[0]}"
        )
    extra = [key for key in answers if key not in benchmark.references]
    if extra and not partial:
        source = ", ".join(
            benchmark.files.get(name, "") for name in ("questions", "captions") if name in benchmark.files
        )
        raise QvlError(f"{path}: {len(extra)} predictions for entries not in {source}, e.g. {extra[0]}")
    return {key: answers[key] for key in benchmark.references}


def _official_key(value: Any, name: str, path: Path, k: int) -> Any:
    """A COCO image id is an integer (a string of digits is accepted, as the benchmark readers do)."""
    if name == "image_id":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise QvlError(
                f"{path}: entry {k} field 'image_id' is not an integer id: {value!r:.60}"
            ) from None
    return value
