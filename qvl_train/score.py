"""``qvl-train score``: the base model and each adapter on one task, scored side by side (a table and JSON).

Tasks and metrics (all reported x100):

* ``instruct`` (a shard or dataset directory; the last answer of each row is the reference): exact match,
  BLEU-4 and ROUGE-L per row, averaged, computed as LLaMA-Factory's ``do_predict`` computes them
  (``ComputeSimilarity`` in its ``train/sft/metric.py``): BLEU-4 is nltk's ``sentence_bleu`` over the
  *characters* of the prediction and reference with smoothing method 3; ROUGE-L is the LCS F1 over jieba's
  words; each row's value is rounded to 4 decimals before averaging.
* ``okvqa`` (the official OK-VQA files + COCO val2014 images): the standard VQA accuracy.
* ``coco`` (the official captions file or Karpathy's split + the images): BLEU-4, METEOR, ROUGE-L and CIDEr
  from ``pycocoevalcap``, the COCO caption evaluation code, on captions tokenized by its Stanford
  PTBTokenizer. Both need Java; without it the captions are tokenized by NLTK's Treebank tokenizer (the same
  Penn Treebank rules in Python) and METEOR is skipped, and the score file and table say so.

The metric packages are the ``eval`` extra (``pip install -e ".[eval]"``), imported only here.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvl_data.errors import QvlError
from qvl_train.config import coerce_types, parse_tool_config
from qvl_train.predict import Generation, GenerationOptions, check_generation

if TYPE_CHECKING:
    from qvl_train.benchmarks import Benchmark

TASKS = ("instruct", "okvqa", "coco")
METRICS = {
    "instruct": ("exact_match", "bleu-4", "rouge-l"),
    "okvqa": ("vqa_accuracy",),
    "coco": ("bleu-4", "meteor", "rouge-l", "cider"),
}
#: Tokens an answer may take, per task, when --max-new-tokens is 0 (short answers, one sentence, free text).
DEFAULT_MAX_NEW_TOKENS = {"instruct": 1024, "okvqa": 32, "coco": 64}
SCORES_FILE = "scores.json"

DESCRIPTION = (
    "Score the base model and each --adapter on one task, side by side: instruct (exact match, BLEU-4, "
    "ROUGE-L on a shard or dataset directory), okvqa (VQA accuracy on the official OK-VQA files) or coco "
    "(BLEU-4, METEOR, ROUGE-L, CIDEr on COCO captions). Writes the predictions and scores.json to --output-dir."
)


def _missing(package: str, error: ImportError) -> QvlError:
    return QvlError(
        f"scoring needs {package} ({error}); install the eval extra: pip install -e '.[eval]' (or pip install qvl[eval])"
    )


# ------------------------------------------------------------------------------------------ VQA accuracy
#
# The answer normalization and accuracy of the official VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py, master a013f00 "Fixed processing answers bug", 2021), which
# OK-VQA uses. No maintained package ships it (lmms-eval carries a port but pulls in a whole evaluation
# framework), so here it is in our own words, with the official tables. Normalization: newlines and tabs
# become spaces and the text is stripped; punctuation is removed (joined) when it touches a space or the
# text has a digit-comma-digit, else replaced by a space; periods not followed by a digit are removed; then
# lower case, number words to digits, articles dropped, contractions restored. Accuracy of a prediction:
# for each of the 10 human answers, min(1, matches among the other 9 / 3), averaged over the 10.
# One deliberate difference: the official script normalizes the prediction and the human answers only when
# the humans disagree (so "Yes." scores 0 against ten "yes"); we always normalize both, as the EvalAI
# evaluation server and lmms-eval do.

_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
# (the official table's capitalised keys never match: the text is lower-cased before the lookup; kept as is)
VQA_CONTRACTIONS = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern as written: "(?!<=\d)" is a lookahead (a typo for a lookbehind) that never blocks a
# match, so every period not followed by a digit goes. Its sub() call passes re.UNICODE (32) as the count.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in VQA_PUNCTUATION:
        # the test reads the original text, the replacement the text so far (as the official loop does)
        out = out.replace(p, "") if (p + " " in text or " " + p in text or joined) else out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles, contractions."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize(answer: str) -> str:
    """An answer as the VQA evaluation compares it: whitespace, punctuation, then digits/articles."""
    return vqa_digits_articles(vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: the mean over the human answers of min(1, how many of the *other* humans gave
    the (normalized) prediction / 3)."""
    if not answers:
        raise ValueError("a VQA question needs its human answers")
    predicted = vqa_normalize(prediction)
    humans = [vqa_normalize(a) for a in answers]
    matches = sum(h == predicted for h in humans)
    # leaving out human i removes one match exactly when human i gave the prediction
    return sum(min(1.0, (matches - (h == predicted)) / 3) for h in humans) / len(humans)


def okvqa_scores(
    predictions: dict[str, str], references: dict[str, list[str]], info: dict[str, dict]
) -> dict[str, Any]:
    """Mean VQA accuracy x100 over the questions (all must have a prediction), and per question type."""
    per_row = {key: vqa_accuracy(predictions[key], answers) for key, answers in references.items()}
    by_type: dict[str, list[float]] = {}
    for key, accuracy in per_row.items():
        by_type.setdefault(str(info.get(key, {}).get("question_type", "")), []).append(accuracy)
    return {
        "vqa_accuracy": 100 * sum(per_row.values()) / len(per_row),
        "per_question_type": {t: 100 * sum(v) / len(v) for t, v in sorted(by_type.items())},
    }


# ------------------------------------------------------------------------------------------ instruction data


class _SpaceTokenizer:
    """rouge-score's tokenizer interface over text that is already words separated by spaces (jieba's)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def _jieba_words(text: str) -> str:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." on stderr
    return " ".join(jieba.cut(text))


def require_instruct_packages() -> None:
    """A one-line error now, rather than after hours of generation, when the metric packages are missing."""
    try:
        import jieba  # noqa: F401
        import nltk  # noqa: F401
        import rouge_score  # noqa: F401
    except ImportError as e:
        raise _missing("jieba, nltk and rouge-score", e) from None


def instruct_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, BLEU-4 and ROUGE-L (x100, the mean over rows of each row's value rounded to 4 decimals),
    as LLaMA-Factory's do_predict reports BLEU-4 and ROUGE-L.

    ROUGE-L uses Google's ``rouge-score`` (the reimplementation of the ROUGE-1.5.5 reference) over jieba's
    words, not LLaMA-Factory's ``rouge-chinese``: rouge-chinese is a 2022 fork with a single release, and on
    the same words its ROUGE-L F (the LCS F1 over all words) is rouge-score's ``rougeL`` F-measure, while
    rouge-score's own tokenizer would drop every non-ASCII word. Exact match compares the stripped texts.
    """
    require_instruct_packages()
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("one reference per prediction")
    if not predictions:
        raise QvlError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SpaceTokenizer())
    smoothing = SmoothingFunction().method3
    em, bleu, rouge = [], [], []
    for prediction, reference in zip(predictions, references, strict=True):
        em.append(100.0 if prediction.strip() == reference.strip() else 0.0)
        hypothesis_words, reference_words = _jieba_words(prediction), _jieba_words(reference)
        if hypothesis_words.split() and reference_words.split():
            rouge.append(round(scorer.score(reference_words, hypothesis_words)["rougeL"].fmeasure * 100, 4))
        else:
            rouge.append(0.0)  # as LLaMA-Factory: an empty side scores 0
        with warnings.catch_warnings():  # nltk warns about zero n-gram overlaps; the smoothing handles them
            warnings.simplefilter("ignore")
            value = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
        bleu.append(round(value * 100, 4))
    n = len(predictions)
    return {"exact_match": sum(em) / n, "bleu-4": sum(bleu) / n, "rouge-l": sum(rouge) / n}


# ------------------------------------------------------------------------------------------ captions

#: What pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS list).
_CAPTION_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
#: Stanford's PTBTokenizer spells brackets -LRB- etc.; lower-cased (-lowerCase) they no longer match the
#: upper-case entries above, so pycocoevalcap keeps "-lrb-" tokens. The Python stand-in does the same.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def java_available() -> bool:
    """Whether ``java`` is on PATH: pycocoevalcap's tokenizer and METEOR run Java programs."""
    return shutil.which("java") is not None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[io.StringIO]:
    """Send file descriptor 2 (a child process's stderr too: the Java tokenizer reports its speed there) to
    a temporary file; its text is in the yielded buffer afterwards, for error messages."""
    captured = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read().decode(errors="replace"))


def python_ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """The no-Java stand-in for pycocoevalcap's PTBTokenizer: NLTK's Penn Treebank tokenizer (the same
    rules: punctuation split off, "isn't" -> "is n't", quotes as `` and '') on the lower-cased caption,
    brackets spelled as Stanford's, the same punctuation dropped, words joined by spaces. It can differ on
    rare text (NLTK splits "&" and "@" inside a word, Stanford keeps "at&t" whole)."""
    from nltk.tokenize import TreebankWordTokenizer

    tokenizer = TreebankWordTokenizer()

    def tokenize(caption: str) -> str:
        words = (_BRACKETS.get(w, w) for w in tokenizer.tokenize(caption.replace("\n", " ").lower()))
        return " ".join(w for w in words if w not in _CAPTION_PUNCTUATION)

    return {key: [tokenize(c) for c in texts] for key, texts in captions.items()}


def java_ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1's, in Java), quietly."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet_stderr() as err:
        try:
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
        except Exception as e:  # Java missing or failing: one line, with what it printed
            raise QvlError(f"the Java PTBTokenizer failed: {e} {err.getvalue().strip()[:300]}") from None


class CaptionScorer:
    """BLEU-4, METEOR, ROUGE-L and CIDEr from pycocoevalcap, as its COCOEvalCap computes them: every caption
    PTB-tokenized, then each scorer over the whole set (BLEU-4 and CIDEr are corpus-level). METEOR's Java
    process starts once and serves every model of a run; :meth:`close` ends it."""

    def __init__(self, use_java: bool | None = None):
        try:
            import pycocoevalcap  # noqa: F401
        except ImportError as e:
            raise _missing("pycocoevalcap", e) from None
        self.java = java_available() if use_java is None else use_java
        self._meteor: Any = None
        self.notes: list[str] = []
        if self.java:
            self.tokenizer = "PTBTokenizer (Stanford CoreNLP 3.4.1, Java), as pycocoevalcap"
        else:
            self.tokenizer = (
                "NLTK TreebankWordTokenizer (no Java on PATH: pycocoevalcap's PTBTokenizer needs it)"
            )
            self.notes.append("METEOR skipped: it runs a Java program and java is not on PATH")
            self.notes.append(
                "captions tokenized by NLTK's Treebank tokenizer instead of the Java PTBTokenizer"
            )

    def tokenize(self, captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
        return java_ptb_tokenize(captions) if self.java else python_ptb_tokenize(captions)

    def score(self, predictions: dict[Any, str], references: dict[Any, list[str]]) -> dict[str, float | None]:
        """Scores x100 (None for a skipped METEOR) of one prediction per image against its references."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if set(predictions) != set(references):
            raise ValueError("predictions and references must cover the same images")
        if not predictions:
            raise QvlError("no predictions to score")
        gts = self.tokenize(references)
        res = self.tokenize({k: [v] for k, v in predictions.items()})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        meteor = None
        if self.java:
            from pycocoevalcap.meteor.meteor import Meteor

            if self._meteor is None:
                self._meteor = Meteor()
            meteor, _ = self._meteor.compute_score(gts, res)
        return {
            "bleu-4": 100 * float(bleu[3]),
            "meteor": None if meteor is None else 100 * float(meteor),
            "rouge-l": 100 * float(rouge),
            "cider": 100 * float(cider),
        }

    def close(self) -> None:
        self._meteor = None  # its __del__ closes the Java process


# ------------------------------------------------------------------------------------------ the command


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
    output_dir: str = "saves/score"
    """Where the predictions of each model (predictions-<name>.jsonl) and scores.json go."""
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
        if isinstance(self.adapter, (list, tuple)):  # YAML: adapter: [a, b]
            self.adapter = ",".join(str(a) for a in self.adapter)
        coerce_types(self)
        self.prompt = self.prompt.replace("\\n", "\n")  # a shell passes the default's \n as two characters
        if self.max_new_tokens == 0:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(self.task, 1024)
        if self.task not in TASKS:
            raise QvlError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check_generation(self)
        if not self.data:
            raise QvlError(f"--data is required (task {self.task}: {_DATA_HELP[self.task]})")
        if self.max_rows < 0:
            raise QvlError(f"max_rows must be >= 0, got {self.max_rows}")
        if self.task != "instruct" and self.dataset:
            raise QvlError("--dataset is for --task instruct")
        for adapter in self.adapters:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise QvlError(f"--adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")

    @property
    def adapters(self) -> list[str]:
        return [a.strip() for a in self.adapter.split(",") if a.strip()]


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


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def _format(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "skipped"
    if base is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({value - base:+.2f})"


def score_table(task: str, names: list[str], scores: list[dict[str, Any]]):
    """A rich table: one row per metric, one column per model, adapters with their difference to base."""
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


def benchmark_for(cfg: ScoreConfig) -> Benchmark:
    """The OK-VQA or COCO records and references that ``cfg`` names."""
    from qvl_train.benchmarks import CAPTION_PROMPT, OKVQA_PROMPT, read_coco_captions, read_okvqa

    if cfg.task == "okvqa":
        prompt = cfg.prompt or OKVQA_PROMPT
        return read_okvqa(cfg.data, cfg.questions, cfg.annotations, cfg.image_dir, prompt, cfg.max_rows)
    prompt = cfg.prompt or CAPTION_PROMPT
    return read_coco_captions(cfg.data, cfg.captions, cfg.image_dir, cfg.split, prompt, cfg.max_rows)


def task_scores(
    task: str, lines: list[dict[str, Any]], benchmark: Benchmark | None, captions: CaptionScorer | None
) -> dict[str, Any]:
    """One model's scores from its prediction lines."""
    if task == "instruct":
        return instruct_scores([line["prediction"] for line in lines], [line["reference"] for line in lines])
    predictions = {line["id"]: line["prediction"] for line in lines}
    if task == "okvqa":
        return okvqa_scores(predictions, benchmark.references, benchmark.info)
    return captions.score(predictions, benchmark.references)


def run(argv: list[str]) -> None:
    cfg = parse_tool_config(ScoreConfig, join_repeated(argv), "qvl-train score", DESCRIPTION)
    from rich.console import Console

    from qvl_train.model import check_compatible, model_config
    from qvl_train.predict import data_source, load_model_for, predict, records_source

    console = Console(highlight=False)
    started = time.perf_counter()
    # the metric packages and the data are checked before any generation, not after hours of it
    captions = CaptionScorer() if cfg.task == "coco" else None
    benchmark = None
    if cfg.task == "instruct":
        require_instruct_packages()
        source = data_source(cfg)
    else:
        benchmark = benchmark_for(cfg)
        source = records_source(benchmark.records, cfg)
    check_compatible(model_config(cfg.model), source.processor, cfg.model)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = model_names(cfg.adapters)
    generation = Generation.from_config(cfg)
    entries = []
    try:
        for name, adapter in zip(names, ["", *cfg.adapters], strict=True):
            model, device, dtype = load_model_for(cfg, adapter)
            rejected: list = []
            predictions_file = out / f"predictions-{_slug(name)}.jsonl"
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
                    "scores": task_scores(cfg.task, lines, benchmark, captions),
                }
            )
    finally:
        if captions is not None:
            captions.close()
    notes = list(captions.notes) if captions else []
    report = {
        "task": cfg.task,
        "metrics": list(METRICS[cfg.task]),
        "scale": "x100",
        "data": cfg.data,
        "files": benchmark.files if benchmark else {},
        "rows": source.total,
        "models": entries,
        "notes": notes,
        "caption_tokenizer": captions.tokenizer if captions else None,
        "generation": asdict(generation),
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / SCORES_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(score_table(cfg.task, names, [e["scores"] for e in entries]))
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"predictions and {SCORES_FILE} in {out}")
