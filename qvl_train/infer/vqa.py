"""The VQA accuracy of the official VQA evaluation, which OK-VQA uses: answer normalization, the accuracy
of one prediction against its human answers, and a benchmark's mean (x100) and mean per question type.

The answer normalization and accuracy of the official VQA evaluation (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, master a013f00 "Fixed processing answers bug", 2021). No
maintained package ships it (lmms-eval carries a port but pulls in a whole evaluation framework), so here it
is in our own words, with the official tables. Normalization: newlines and tabs become spaces and the text
is stripped; punctuation is removed (joined) when it touches a space or the text has a digit-comma-digit,
else replaced by a space; periods not followed by a digit are removed; then lower case, number words to
digits, articles dropped, contractions restored. Accuracy of a prediction: for each of the 10 human
answers, min(1, matches among the other 9 / 3), averaged over the 10.

One deliberate difference: the official script normalizes the prediction and the human answers only when
the humans disagree (so "Yes." scores 0 against ten "yes"); we always normalize both, as the EvalAI
evaluation server and lmms-eval do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

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
