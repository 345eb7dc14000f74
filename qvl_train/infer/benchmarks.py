"""Readers of the official OK-VQA and COCO caption files: each question or image becomes a unified record
(one user turn holding ``<image>`` and the prompt, no answer) and its references.

* **OK-VQA** (Marino et al., 2019; okvqa.allenai.org): ``OpenEnded_mscoco_val2014_questions.json``
  (``{"questions": [{"image_id", "question", "question_id"}]}``) and ``mscoco_val2014_annotations.json``
  (``{"annotations": [{"question_id", "image_id", "question_type", "answers": [{"answer", ...}] x 10}]}``),
  images from COCO val2014 named ``COCO_val2014_%012d.jpg``.
* **COCO captions**: the official ``captions_val2014.json`` (``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``), or Karpathy's split file ``dataset_coco.json``
  (``{"images": [{"filepath", "filename", "split", "cocoid", "sentences": [{"raw"}]}]}``; its ``test`` split
  is the 5,000 images papers report on).

A missing image stops the run (a benchmark scored on part of its images is not comparable to anything), and
so does a file without questions or images, or an entry without a field the reader needs: one line naming
the file, the entry and the field. Scoring predictions made elsewhere reads no image (``check_images``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_data.errors import QvlError
from qvl_data.schema import Record
from qvl_train.infer.files import require_regular_file

OKVQA_QUESTIONS = "OpenEnded_mscoco_val2014_questions.json"
OKVQA_ANNOTATIONS = "mscoco_val2014_annotations.json"
COCO_CAPTIONS = ("annotations/captions_val2014.json", "captions_val2014.json")
KARPATHY_FILE = "dataset_coco.json"
COCO_IMAGE = "COCO_val2014_{:012d}.jpg"
IMAGE_FOLDER = "val2014"

# The prompts Qwen2.5-VL's own evaluations use (as lmms-eval's ok_vqa and coco_cap tasks ask).
OKVQA_PROMPT = "<image>{question}\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "<image>Provide a one-sentence caption for the provided image."


@dataclass
class Benchmark:
    """Records to answer and, per record id, the reference answers (VQA) or captions (COCO)."""

    task: str
    records: list[Record]
    references: dict[str, list[str]]
    # per record id: extra fields the score file keeps (question_id, question_type, image_id, ...)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # what was read, for the score file
    inputs: list[Path] = field(default_factory=list)  # the annotation files read (no output may replace them)


def _load_json(path: Path, what: str) -> Any:
    require_regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QvlError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QvlError(f"{path}: cannot read the {what} ({e})") from None


def _field(entry: Any, name: str, path: Path, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """``entry[name]``, or one line naming the file, the entry and the field that is missing or wrong."""
    if not isinstance(entry, dict):
        raise QvlError(f"{path}: {where} is not a JSON object")
    if name not in entry:
        raise QvlError(f"{path}: {where} has no field {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise QvlError(f"{path}: {where} field {name!r} is {type(value).__name__} {value!r:.60}")
    return value


def _id(entry: Any, name: str, path: Path, where: str) -> int:
    """An integer id field (COCO's ids are integers; a string of digits is accepted)."""
    value = _field(entry, name, path, where, (int, str))
    try:
        return int(value)
    except ValueError:
        raise QvlError(f"{path}: {where} field {name!r} is not an integer id: {value!r:.60}") from None


def _image_dir(data: Path, image_dir: str) -> Path:
    """``--image-dir``, else ``<data>/val2014`` when it exists, else ``<data>``."""
    if image_dir:
        return Path(image_dir)
    return data / IMAGE_FOLDER if (data / IMAGE_FOLDER).is_dir() else data


def _check_images(paths: list[Path], where: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise QvlError(
            f"{len(missing)} of {len(paths)} images are missing, e.g. {missing[0]}; put the COCO images in "
            f"{where} (or pass --image-dir)"
        )


def _record(task: str, key: Any, index: int, prompt: str, image: Path) -> Record:
    return Record(
        id=f"{task}:{key}",
        source=task,
        index=index,
        system=None,
        messages=[{"role": "user", "content": prompt}],
        images=[str(image)],
    )


def read_okvqa(
    data: str | Path,
    questions: str = "",
    annotations: str = "",
    image_dir: str = "",
    prompt: str = OKVQA_PROMPT,
    max_rows: int = 0,
    check_images: bool = True,
) -> Benchmark:
    """OK-VQA's official question and annotation files (in ``data`` unless given) and the COCO images: one
    record per question, in the questions file's order, with the question's 10 human answers."""
    data = Path(data)
    q_path = Path(questions) if questions else data / OKVQA_QUESTIONS
    a_path = Path(annotations) if annotations else data / OKVQA_ANNOTATIONS
    q_file, a_file = (
        _load_json(q_path, "OK-VQA questions file"),
        _load_json(a_path, "OK-VQA annotations file"),
    )
    if not isinstance(q_file, dict) or not isinstance(q_file.get("questions"), list):
        raise QvlError(f'{q_path}: expected {{"questions": [...]}} (the official OK-VQA questions file)')
    if not isinstance(a_file, dict) or not isinstance(a_file.get("annotations"), list):
        raise QvlError(f'{a_path}: expected {{"annotations": [...]}} (the official OK-VQA annotations file)')
    if not q_file["questions"]:
        raise QvlError(f'{q_path}: "questions" is empty: no question to score')
    by_question = {
        _field(a, "question_id", a_path, f"annotations[{i}]"): (i, a)
        for i, a in enumerate(a_file["annotations"])
    }
    images = _image_dir(data, image_dir)
    selected = q_file["questions"][:max_rows] if max_rows > 0 else q_file["questions"]
    benchmark = Benchmark(
        "okvqa", [], {}, files={"questions": str(q_path), "annotations": str(a_path)}, inputs=[q_path, a_path]
    )
    paths = []
    for index, q in enumerate(selected):
        where = f"questions[{index}]"
        question_id = _field(q, "question_id", q_path, where)
        image_id = _id(q, "image_id", q_path, where)
        question = _field(q, "question", q_path, where, str)
        if question_id not in by_question:
            raise QvlError(f"{a_path}: no annotation for question_id {question_id} of {q_path.name}")
        k, annotation = by_question[question_id]
        answers = _field(annotation, "answers", a_path, f"annotations[{k}]", list)
        if not answers:
            raise QvlError(f"{a_path}: annotations[{k}] field 'answers' is empty (question_id {question_id})")
        humans = [
            str(_field(a, "answer", a_path, f"annotations[{k}].answers[{j}]")) for j, a in enumerate(answers)
        ]
        path = images / COCO_IMAGE.format(image_id)
        paths.append(path)
        record = _record("okvqa", question_id, index, prompt.replace("{question}", question), path)
        benchmark.records.append(record)
        benchmark.references[record["id"]] = humans
        benchmark.info[record["id"]] = {
            "question_id": question_id,
            "image_id": q["image_id"],
            "question": question,
            "question_type": annotation.get("question_type", ""),
            "answer_type": annotation.get("answer_type", ""),
        }
    if check_images:
        _check_images(paths, images)
    return benchmark


def _find_captions(data: Path, captions: str) -> Path:
    if captions:
        return Path(captions)
    for name in (KARPATHY_FILE, *COCO_CAPTIONS):
        if (data / name).is_file():
            return data / name
    raise QvlError(
        f"{data}: no captions file; put Karpathy's {KARPATHY_FILE} or the official "
        f"{COCO_CAPTIONS[0]} there (or pass --captions)"
    )


def read_coco_captions(
    data: str | Path,
    captions: str = "",
    image_dir: str = "",
    split: str = "test",
    prompt: str = CAPTION_PROMPT,
    max_rows: int = 0,
    check_images: bool = True,
) -> Benchmark:
    """COCO captions from the official captions file or Karpathy's ``dataset_coco.json`` (its ``split``):
    one record per image (official: ascending image id; Karpathy: file order) with all its captions."""
    data = Path(data)
    path = _find_captions(data, captions)
    content = _load_json(path, "captions file")
    images_list = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images_list, list):
        raise QvlError(f"{path}: expected the official captions file or Karpathy's dataset_coco.json")
    if not images_list:
        raise QvlError(f'{path}: "images" is empty: no image to score')
    karpathy = isinstance(images_list[0], dict) and "sentences" in images_list[0]
    entries: list[tuple[int, list[Path], list[str]]] = []  # (image id, candidate paths, captions)
    if karpathy:
        base = Path(image_dir) if image_dir else data
        for i, image in enumerate(images_list):
            where = f"images[{i}]"
            if _field(image, "split", path, where, str) == split:
                name = _field(image, "filename", path, where, str)
                sentences = _field(image, "sentences", path, where, list)
                refs = [
                    _field(x, "raw", path, f"{where}.sentences[{j}]", str) for j, x in enumerate(sentences)
                ]
                candidates = [base / image.get("filepath", "") / name, base / name]
                entries.append((_id(image, "cocoid", path, where), candidates, refs))
        if not entries:
            raise QvlError(
                f"{path}: no image in split {split!r} (Karpathy's splits: train, restval, val, test)"
            )
    else:
        if not isinstance(content.get("annotations"), list):
            raise QvlError(f'{path}: expected "annotations" (the official COCO captions file)')
        by_image: dict[int, list[str]] = {}
        for i, annotation in enumerate(content["annotations"]):
            where = f"annotations[{i}]"
            caption = _field(annotation, "caption", path, where, str)
            by_image.setdefault(_id(annotation, "image_id", path, where), []).append(caption)
        base = _image_dir(data, image_dir)
        ids = [_id(image, "id", path, f"images[{i}]") for i, image in enumerate(images_list)]
        for image_id, i in sorted((image_id, i) for i, image_id in enumerate(ids)):
            if image_id in by_image:
                name = _field(images_list[i], "file_name", path, f"images[{i}]", str)
                candidates = [base / name, data / IMAGE_FOLDER / name]
                entries.append((image_id, candidates, by_image[image_id]))
        if not entries:
            raise QvlError(f'{path}: no image of "images" has a caption in "annotations"')
    entries = entries[:max_rows] if max_rows > 0 else entries
    benchmark = Benchmark(
        "coco",
        [],
        {},
        files={"captions": str(path), "format": "karpathy" if karpathy else "official"},
        inputs=[path],
    )
    paths = []
    for index, (image_id, candidates, refs) in enumerate(entries):
        image_path = next((c for c in candidates if c.is_file()), candidates[0])
        paths.append(image_path)
        record = _record("coco", image_id, index, prompt, image_path)
        benchmark.records.append(record)
        benchmark.references[record["id"]] = refs
        benchmark.info[record["id"]] = {"image_id": image_id}
    if check_images:
        _check_images(paths, base)
    return benchmark
