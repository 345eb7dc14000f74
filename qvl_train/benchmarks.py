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

A missing image stops the run (a benchmark scored on part of its images is not comparable to anything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_data.errors import QvlError
from qvl_data.schema import Record

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


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise QvlError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QvlError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


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
    by_question = {a["question_id"]: a for a in a_file["annotations"]}
    images = _image_dir(data, image_dir)
    selected = q_file["questions"][:max_rows] if max_rows > 0 else q_file["questions"]
    benchmark = Benchmark("okvqa", [], {}, files={"questions": str(q_path), "annotations": str(a_path)})
    paths = []
    for index, q in enumerate(selected):
        annotation = by_question.get(q["question_id"])
        if annotation is None:
            raise QvlError(f"{a_path}: no annotation for question_id {q['question_id']} of {q_path.name}")
        path = images / COCO_IMAGE.format(int(q["image_id"]))
        paths.append(path)
        record = _record("okvqa", q["question_id"], index, prompt.replace("{question}", q["question"]), path)
        benchmark.records.append(record)
        benchmark.references[record["id"]] = [str(a["answer"]) for a in annotation["answers"]]
        benchmark.info[record["id"]] = {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "question": q["question"],
            "question_type": annotation.get("question_type", ""),
            "answer_type": annotation.get("answer_type", ""),
        }
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
) -> Benchmark:
    """COCO captions from the official captions file or Karpathy's ``dataset_coco.json`` (its ``split``):
    one record per image (official: ascending image id; Karpathy: file order) with all its captions."""
    data = Path(data)
    path = _find_captions(data, captions)
    content = _load_json(path, "captions file")
    images_list = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images_list, list):
        raise QvlError(f"{path}: expected the official captions file or Karpathy's dataset_coco.json")
    karpathy = bool(images_list) and "sentences" in images_list[0]
    entries: list[tuple[int, list[Path], list[str]]] = []  # (image id, candidate paths, captions)
    if karpathy:
        base = Path(image_dir) if image_dir else data
        for image in images_list:
            if image.get("split") == split:
                candidates = [base / image.get("filepath", "") / image["filename"], base / image["filename"]]
                entries.append((int(image["cocoid"]), candidates, [s["raw"] for s in image["sentences"]]))
        if not entries:
            raise QvlError(
                f"{path}: no image in split {split!r} (Karpathy's splits: train, restval, val, test)"
            )
    else:
        if not isinstance(content.get("annotations"), list):
            raise QvlError(f'{path}: expected "annotations" (the official COCO captions file)')
        by_image: dict[int, list[str]] = {}
        for annotation in content["annotations"]:
            by_image.setdefault(int(annotation["image_id"]), []).append(annotation["caption"])
        base = _image_dir(data, image_dir)
        for image in sorted(images_list, key=lambda i: int(i["id"])):
            if int(image["id"]) in by_image:
                candidates = [base / image["file_name"], data / IMAGE_FOLDER / image["file_name"]]
                entries.append((int(image["id"]), candidates, by_image[int(image["id"])]))
    entries = entries[:max_rows] if max_rows > 0 else entries
    benchmark = Benchmark(
        "coco", [], {}, files={"captions": str(path), "format": "karpathy" if karpathy else "official"}
    )
    paths = []
    for index, (image_id, candidates, refs) in enumerate(entries):
        image_path = next((c for c in candidates if c.is_file()), candidates[0])
        paths.append(image_path)
        record = _record("coco", image_id, index, prompt, image_path)
        benchmark.records.append(record)
        benchmark.references[record["id"]] = refs
        benchmark.info[record["id"]] = {"image_id": image_id}
    _check_images(paths, base)
    return benchmark
