"""Answer scoring of VQAv2 / OK-VQA / GQA: normalisation, VQA accuracy, exact match.

Normalisation (the rules of the official VQA evaluation, GT-Vision-Lab/VQA vqaEval.py, as it runs): newlines
and tabs become spaces; a punctuation mark is deleted when it touches a space in the answer (or the answer holds
a "1,000"-style number) and becomes a space otherwise; a period is deleted unless a digit follows it; lower case;
number words become digits ("two" -> "2"); the articles a / an / the are removed; vqaEval's contractions get
their apostrophe back ("dont" -> "don't"); whitespace collapses.

Accuracy of one prediction against the human answers: ``min(#humans who gave it / 3, 1)`` after normalising
both; ``leave_one_out=True`` is vqaEval's form, the mean of that over the 10 subsets of 9 answers (and no
normalisation of the human answers when all gave the same string). VQAv2 / OK-VQA files are always scored that way; GQA
(one answer) by exact match. Exact match: the normalised prediction equals the normalised most common answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["METRICS", "normalize_answer", "vqa_accuracy", "exact_match"]

# how a row is scored: "vqa" (min(matches / 3, 1)), "vqa_official" (vqaEval's leave-one-out), "exact" (GQA)
METRICS = ("vqa", "vqa_official", "exact")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# vqaEval's contraction table, the entries a lower-cased word can reach ("im", "ive", "id" are not among them),
# its oddities kept so that scores match it: "somebody'd" -> "somebodyd", "let's" / "she's" map to themselves.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's isnt=isn't
itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
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
""".split())
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# vqaEval's period rule as it runs: its "(?!<=\d)" is a look-ahead (a typo for a look-behind), so a period is
# deleted unless a digit follows it ("3.5" and ".5" stay, "5." -> "5", "u.s." -> "us")
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    """Each mark is deleted when it touches a space in ``text`` (or ``text`` holds a "1,000"-style number), else
    replaced by a space; the tests look at the original text, not at the text being edited (as vqaEval)."""
    out = text
    strip_all = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if strip_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _clean(answer: str) -> str:
    """The cleaning vqaEval applies to every answer before anything else: newlines and tabs to spaces, strip."""
    if not isinstance(answer, str):
        raise ValueError(f"an answer must be a string, got {type(answer).__name__}")
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """VQAv2 normalisation of one answer string (see the module docstring)."""
    text = _punctuation(_clean(answer)).lower()
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str], leave_one_out: bool = False) -> float:
    """``min(matches / 3, 1)`` with ``matches`` = human answers equal to the prediction (both normalised).

    ``leave_one_out=True`` is the official VQAv2 evaluation (vqaEval.py) exactly: the mean over the ``n`` subsets
    that leave one human answer out of ``min(matches in the subset / 3, 1)``; and, as there, the answers are only
    normalised when the humans gave more than one distinct string (when all gave the same string, the
    prediction must equal it as written: "yes" scores 0 against ten "Yes"). The prediction itself is always
    normalised, as the answer processors of LLaVA's and LAVIS's VQAv2 pipelines do before submitting to the
    evaluation server."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer, got none")
    if not leave_one_out:
        pred = normalize_answer(prediction)
        return min(sum(normalize_answer(a) == pred for a in answers) / 3.0, 1.0)
    if len(answers) == 1:  # no subset to leave out: the plain form
        return vqa_accuracy(prediction, answers)
    cleaned = [_clean(a) for a in answers]
    if len(set(cleaned)) > 1:
        pred, gts = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    else:  # the prediction is normalised as a submission is (LLaVA's / LAVIS's answer processor), not the answers
        pred, gts = normalize_answer(prediction), cleaned
    hits = [gt == pred for gt in gts]
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / len(hits)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the normalised most common answer (ties: the first)."""
    if len(answers) == 0:
        raise ValueError("exact_match needs at least one answer, got none")
    normalised = [normalize_answer(a) for a in answers]
    top = Counter(normalised).most_common(1)[0][1]
    best = next(a for a in normalised if normalised.count(a) == top)
    return float(normalize_answer(prediction) == best)
