"""``qvl-train score``: the base model and each adapter on one task, scored side by side (a table and
``scores.json``).

Tasks: ``instruct`` (a shard or dataset directory; the last answer of each row is the reference: exact
match, BLEU-4, ROUGE-L), ``okvqa`` (the official OK-VQA files + COCO val2014 images: the standard VQA
accuracy, :mod:`qvl_train.infer.vqa`) and ``coco`` (the official captions file or Karpathy's split + the
images: BLEU-4, METEOR, ROUGE-L, CIDEr); the metrics are :mod:`qvl_train.infer.metrics`, all x100.

Each model's predictions and ``scores.json`` go to ``--output-dir``, each written complete or not at all;
an existing file there is replaced only when qvl wrote it (or with ``--overwrite``).

``--predictions FILE`` (repeatable) scores files made elsewhere instead, without loading a model
(:mod:`qvl_train.infer.prediction_files`): the same table and ``scores.json``, one column per file.
"""

from __future__ import annotations

import gc
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvl_data.errors import QvlError
from qvl_data.files import refuse_foreign
from qvl_train.config import coerce_types, parse_tool_config
from qvl_train.distributed import Dist, setup_distributed, teardown_distributed
from qvl_train.infer.files import check_output_dir, output_lock, prepare_output_dir
from qvl_train.infer.generate import Generation, GenerationOptions, check_generation, load_model_for
from qvl_train.infer.metrics import CaptionScorer, instruct_scores, require_instruct_packages
from qvl_train.infer.prediction_files import benchmark_predictions, instruct_predictions
from qvl_train.infer.predictions import is_predictions_file, predict
from qvl_train.infer.prompts import data_source, records_source
from qvl_train.infer.scores_file import METRICS, SCORES_FILE, is_scores_file, score_table, write_scores
from qvl_train.infer.vqa import okvqa_scores

if TYPE_CHECKING:
    from qvl_train.infer.benchmarks import Benchmark

TASKS = ("instruct", "okvqa", "coco")
LOCK_FILE = ".qvl-score.lock"  # in --output-dir while a score writes there (removed when it ends)
#: Tokens an answer may take, per task, when --max-new-tokens is 0 (short answers, one sentence, free text).
DEFAULT_MAX_NEW_TOKENS = {"instruct": 1024, "okvqa": 32, "coco": 64}
DESCRIPTION = (
    "Score the base model and each --adapter on one task, side by side: instruct (exact match, BLEU-4, "
    "ROUGE-L on a shard or dataset directory), okvqa (VQA accuracy on the official OK-VQA files) or coco "
    "(BLEU-4, METEOR, ROUGE-L, CIDEr on COCO captions). Writes the predictions and scores.json to --output-dir. "
    "With --predictions, scores prediction files made elsewhere instead, without loading a model."
)


@dataclass
class ScoreConfig(GenerationOptions):
    task: str = "instruct"
    """instruct (your data: exact match, BLEU-4, ROUGE-L), okvqa (VQA accuracy) or coco (caption metrics)."""
    data: str = ""
    """instruct: a shard directory or a dataset directory. okvqa: the folder holding the official question
    and annotation files (and val2014/ with the COCO images). coco: the folder holding dataset_coco.json or
    annotations/captions_val2014.json (and val2014/)."""
    dataset: str = ""
    """instruct: comma-separated dataset names (required for a dataset directory; for shards, a filter)."""
    model: str = "tiny"
    """Base model: a local Qwen2.5-VL checkpoint dir, a hub id, a merged export dir, or ``tiny``."""
    adapter: str = ""
    """LoRA adapter directories to compare with the base model: repeat --adapter or separate them by commas."""
    predictions: str = ""
    """Score prediction files instead of generating (no model is loaded), side by side, the first as the
    table's reference column: repeat --predictions or separate them by commas. okvqa: the official results
    format [{"question_id", "answer"}]; coco: [{"image_id", "caption"}]; any task: qvl's predictions JSONL
    (the only format for instruct, whose references it holds: no --data then)."""
    output_dir: str = "saves/score"
    """Where the predictions of each model (predictions-<name>.jsonl) and scores.json go. Files qvl wrote
    there are replaced (each one complete, at its end); any other file of those names only with --overwrite."""
    overwrite: bool = False
    """Replace a predictions-<name>.jsonl or scores.json in --output-dir that qvl did not write."""
    questions: str = ""
    """okvqa: the questions file (default: <data>/OpenEnded_mscoco_val2014_questions.json)."""
    annotations: str = ""
    """okvqa: the annotations file (default: <data>/mscoco_val2014_annotations.json)."""
    captions: str = ""
    """coco: the captions file, official or Karpathy's (default: <data>/dataset_coco.json, else
    <data>/annotations/captions_val2014.json or <data>/captions_val2014.json)."""
    split: str = "test"
    """coco with Karpathy's file: the split to score (test: the 5,000 images papers report on)."""
    image_dir: str = ""
    """okvqa and coco: the folder of the COCO images (default: <data>/val2014 if it exists, else <data>)."""
    prompt: str = ""
    """okvqa and coco: the user prompt; ``<image>`` marks the image, ``{question}`` the question and ``\\n`` a
    line break (default:
    '<image>{question}\\nAnswer the question using a single word or phrase.', or for coco '<image>Provide a
    one-sentence caption for the provided image.')."""
    media_dir: str = ""
    """instruct with a dataset directory: folder image paths are relative to."""
    max_rows: int = 0
    """Score the first N rows (questions, images) only (0: all)."""
    max_new_tokens: int = 0
    """Most tokens generated per answer; 0: the task's default (instruct 1024, okvqa 32, coco 64)."""

    def __post_init__(self) -> None:
        for name in ("adapter", "predictions"):  # YAML: adapter: [a, b]
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, ",".join(str(a) for a in getattr(self, name)))
        coerce_types(self)
        self.prompt = self.prompt.replace("\\n", "\n")  # a shell passes the default's \n as two characters
        if self.max_new_tokens == 0:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(self.task, 1024)
        if self.task not in TASKS:
            raise QvlError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check_generation(self)
        if self.prediction_files and self.adapters:
            raise QvlError("--predictions scores files without loading a model: leave out --adapter")
        if self.prediction_files and self.task == "instruct":
            if self.data:
                raise QvlError(
                    "--task instruct --predictions reads the references from the files (qvl's predictions "
                    "JSONL): leave out --data"
                )
        elif not self.data:
            raise QvlError(f"--data is required (task {self.task}: {_DATA_HELP[self.task]})")
        if self.max_rows < 0:
            raise QvlError(f"max_rows must be >= 0, got {self.max_rows}")
        if self.task != "instruct" and self.dataset:
            raise QvlError("--dataset is for --task instruct")
        for adapter in self.adapters:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise QvlError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
        check_output_dir(self.output_dir, "--output-dir")

    @property
    def adapters(self) -> list[str]:
        return [a.strip() for a in self.adapter.split(",") if a.strip()]

    @property
    def prediction_files(self) -> list[str]:
        return [p.strip() for p in self.predictions.split(",") if p.strip()]


_DATA_HELP = {
    "instruct": "a shard directory or a dataset directory",
    "okvqa": "the folder of the official OK-VQA files",
    "coco": "the folder of the COCO captions file",
}


def join_repeated(argv: list[str], option: str = "--adapter") -> list[str]:
    """``--adapter A --adapter B`` (argparse keeps the last) -> one ``--adapter A,B``."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == option and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest + [option, ",".join(values)] if values else rest


def model_names(adapters: list[str]) -> list[str]:
    """Column names: ``base``, then each adapter's folder name (its path where two names clash)."""
    names = [Path(a.rstrip("/")).name or a for a in adapters]
    clash = {n for n in names if names.count(n) > 1 or n == "base"}
    labels = [a if n in clash else n for a, n in zip(adapters, names, strict=True)]
    return ["base", *(f"adapter:{label}" if label == "base" else label for label in labels)]


def column_names(files: list[str]) -> list[str]:
    """Column names of --predictions files: each file's name without its suffix (its path where two clash)."""
    names = [Path(f).stem or f for f in files]
    return [f if names.count(n) > 1 else n for f, n in zip(files, names, strict=True)]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def predictions_path(out: Path, name: str) -> Path:
    """Where one model's predictions go in --output-dir."""
    return out / f"predictions-{_slug(name)}.jsonl"


def benchmark_for(cfg: ScoreConfig, check_images: bool = True) -> Benchmark:
    """The OK-VQA or COCO records and references that ``cfg`` names (``check_images``: every image there)."""
    from qvl_train.infer.benchmarks import CAPTION_PROMPT, OKVQA_PROMPT, read_coco_captions, read_okvqa

    if cfg.task == "okvqa":
        prompt = cfg.prompt or OKVQA_PROMPT
        return read_okvqa(
            cfg.data, cfg.questions, cfg.annotations, cfg.image_dir, prompt, cfg.max_rows, check_images
        )
    prompt = cfg.prompt or CAPTION_PROMPT
    return read_coco_captions(
        cfg.data, cfg.captions, cfg.image_dir, cfg.split, prompt, cfg.max_rows, check_images
    )


def benchmark_scores(
    task: str, predictions: dict[str, str], benchmark: Benchmark, captions: CaptionScorer | None
) -> dict[str, Any]:
    """One model's scores on OK-VQA or COCO from its answer (caption) per record id."""
    if task == "okvqa":
        return okvqa_scores(predictions, benchmark.references, benchmark.info)
    return captions.score(predictions, benchmark.references)


def task_scores(
    task: str, lines: list[dict[str, Any]], benchmark: Benchmark | None, captions: CaptionScorer | None
) -> dict[str, Any]:
    """One model's scores from its prediction lines."""
    if task == "instruct":
        return instruct_scores([line["prediction"] for line in lines], [line["reference"] for line in lines])
    return benchmark_scores(task, {line["id"]: line["prediction"] for line in lines}, benchmark, captions)


@dataclass
class Runs:
    """What was scored: one entry per column (name, model, adapter, predictions file, rows, scores)."""

    entries: list[dict[str, Any]]
    rows: int
    benchmark: Benchmark | None = None
    generation: Generation | None = None  # None: the predictions were read, not generated


def score_models(
    cfg: ScoreConfig, captions: CaptionScorer | None, hold: ExitStack, dist: Dist | None = None
) -> Runs:
    """Generate with the base model and each adapter, one after another, and score each (under torchrun:
    the rows split over ``dist``'s ranks, every rank holding all lines, rank 0 writing and scoring). The
    output folder's lock is taken into ``hold`` once the outputs are checked."""
    dist = dist or Dist()
    from qvl_train.model import check_compatible, model_config

    benchmark = None
    if cfg.task == "instruct":
        source = data_source(cfg)
    else:
        benchmark = benchmark_for(cfg)
        source = records_source(benchmark.records, cfg, benchmark.inputs)
    check_compatible(model_config(cfg.model), source.processor, cfg.model)

    out = Path(cfg.output_dir)
    names = model_names(cfg.adapters)
    for name in names:
        refuse_foreign(
            predictions_path(out, name),
            is_predictions_file,
            "predictions file",
            "--output-dir",
            cfg.overwrite,
            source.inputs,
        )
    refuse_foreign(
        out / SCORES_FILE, is_scores_file, "scores file", "--output-dir", cfg.overwrite, source.inputs
    )
    prepare_output_dir(out)
    hold.enter_context(output_lock(out / LOCK_FILE, out, "qvl-train score", dist))
    generation = Generation.from_config(cfg)
    entries = []
    for name, adapter in zip(names, ["", *cfg.adapters], strict=True):
        model, device, dtype = load_model_for(cfg, adapter, dist.local_rank)
        rejected: list = []
        predictions_file = predictions_path(out, name)
        lines = predict(
            model,
            source.make(),
            source.total,
            source.tokenizer,
            source.processor,
            generation,
            device,
            dtype,
            cfg.batch_size,
            predictions_file,
            cfg.quiet,
            label=name,
            on_rejection=rejected.append,
            references=benchmark.references if benchmark else None,
            dist=dist,
        )
        del model  # before the next one loads: one model in memory at a time
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        if rejected and benchmark is not None:
            first = rejected[0]
            raise QvlError(f"{first.message} ({first.reason}): every benchmark image must be usable")
        entries.append(
            {
                "name": name,
                "model": cfg.model,
                "adapter": adapter,
                "predictions": str(predictions_file),
                "rows": len(lines),
                "skipped_rows": len(rejected),
                "scores": task_scores(cfg.task, lines, benchmark, captions) if dist.main else None,
            }
        )
    return Runs(entries, source.total, benchmark, generation)


def score_files(
    cfg: ScoreConfig, captions: CaptionScorer | None, hold: ExitStack, dist: Dist | None = None
) -> Runs:
    """Score each --predictions file (made elsewhere, or by qvl) without loading a model; the output
    folder's lock is taken into ``hold`` once the output is checked."""
    files = cfg.prediction_files
    benchmark = None if cfg.task == "instruct" else benchmark_for(cfg, check_images=False)
    inputs = [*map(Path, files), *(benchmark.inputs if benchmark else [])]
    scores_file = Path(cfg.output_dir) / SCORES_FILE
    refuse_foreign(scores_file, is_scores_file, "scores file", "--output-dir", cfg.overwrite, inputs)
    prepare_output_dir(cfg.output_dir)
    hold.enter_context(
        output_lock(Path(cfg.output_dir) / LOCK_FILE, Path(cfg.output_dir), "qvl-train score", dist)
    )
    entries = []
    for name, path in zip(column_names(files), files, strict=True):
        if benchmark is None:
            predictions, references = instruct_predictions(path)
            if cfg.max_rows > 0:
                predictions, references = predictions[: cfg.max_rows], references[: cfg.max_rows]
            rows, scores = len(predictions), instruct_scores(predictions, references)
        else:
            answers = benchmark_predictions(path, benchmark, partial=cfg.max_rows > 0)
            rows, scores = len(answers), benchmark_scores(cfg.task, answers, benchmark, captions)
        entry = {"name": name, "model": None, "adapter": None, "predictions": path, "rows": rows}
        entries.append({**entry, "skipped_rows": 0, "scores": scores})
    rows = len(benchmark.records) if benchmark else entries[0]["rows"]
    return Runs(entries, rows, benchmark)


def run(argv: list[str]) -> None:
    with ExitStack() as hold:  # the output folder's lock, held until scores.json is written
        _run(argv, hold)


def _run(argv: list[str], hold: ExitStack) -> None:
    argv = join_repeated(join_repeated(argv), "--predictions")
    cfg = parse_tool_config(ScoreConfig, argv, "qvl-train score", DESCRIPTION)
    from rich.console import Console

    console = Console(highlight=False)
    started = time.perf_counter()
    # the metric packages and the data are checked before any generation, not after hours of it
    captions = CaptionScorer() if cfg.task == "coco" else None
    if cfg.task == "instruct":
        require_instruct_packages()
    dist = setup_distributed(cfg)  # torchrun: the rows split over the ranks
    try:
        if cfg.prediction_files:
            runs = score_files(cfg, captions, hold, dist)
        else:
            runs = score_models(cfg, captions, hold, dist)
    finally:
        teardown_distributed()
        if captions is not None:
            captions.close()
    if not dist.main:
        return  # rank 0 writes scores.json and the table
    notes = list(captions.notes) if captions else []
    report = {
        "task": cfg.task,
        "metrics": list(METRICS[cfg.task]),
        "scale": "x100",
        "data": cfg.data,
        "files": runs.benchmark.files if runs.benchmark else {},
        "rows": runs.rows,
        "models": runs.entries,
        "notes": notes,
        "caption_tokenizer": captions.tokenizer if captions else None,
        "generation": asdict(runs.generation) if runs.generation else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    out = Path(cfg.output_dir)
    write_scores(out / SCORES_FILE, report)
    console.print(
        score_table(cfg.task, [e["name"] for e in runs.entries], [e["scores"] for e in runs.entries])
    )
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"predictions and {SCORES_FILE} in {out}" if runs.generation else f"{SCORES_FILE} in {out}")
