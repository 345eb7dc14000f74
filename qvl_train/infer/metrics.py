"""Instruction-data and caption metrics (x100), pure functions over predictions and references; the
metric packages are the ``eval`` extra (``pip install -e ".[eval]"``), imported only here.

* instruction data: exact match, BLEU-4 and ROUGE-L per row, averaged, computed as LLaMA-Factory's
  ``do_predict`` computes them (``ComputeSimilarity`` in its ``train/sft/metric.py``): BLEU-4 is nltk's
  ``sentence_bleu`` over the *characters* of the prediction and reference with smoothing method 3; ROUGE-L
  is the LCS F1 over jieba's words; each row's value is rounded to 4 decimals before averaging.
* COCO captions: BLEU-4, METEOR, ROUGE-L and CIDEr from ``pycocoevalcap``, the COCO caption evaluation
  code, on captions tokenized by its Stanford PTBTokenizer. Both need Java; without it the captions are
  tokenized by NLTK's Treebank tokenizer (the same Penn Treebank rules in Python) and METEOR is skipped,
  and :class:`CaptionScorer` says so in its ``notes``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from qvl_data.errors import QvlError


def missing_package(package: str, error: ImportError) -> QvlError:
    """The one-line error for a metric package that is not installed."""
    return QvlError(
        f"scoring needs {package} ({error}); install the eval extra: pip install -e '.[eval]' (or pip install qvl[eval])"
    )


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
        raise missing_package("jieba, nltk and rouge-score", e) from None


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
            raise missing_package("pycocoevalcap", e) from None
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
