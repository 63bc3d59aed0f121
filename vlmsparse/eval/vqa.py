"""VQAv2 / OK-VQA / GQA answer scoring, their official data files, and batched generation evaluation.

Normalisation (the rules of the official VQA evaluation, GT-Vision-Lab/VQA vqaEval.py, as it runs): newlines
and tabs become spaces; a punctuation mark is deleted when it touches a space in the answer (or the answer holds
a "1,000"-style number) and becomes a space otherwise; a period is deleted unless a digit follows it; lower case;
number words become digits ("two" -> "2"); the articles a / an / the are removed; vqaEval's contractions get
their apostrophe back ("dont" -> "don't"); whitespace collapses.

Accuracy of one prediction against the human answers: ``min(#humans who gave it / 3, 1)`` after normalising
both; ``leave_one_out=True`` is vqaEval's form, the mean of that over the 10 subsets of 9 answers (and no
normalisation of the human answers when all gave the same string). VQAv2 / OK-VQA files are always scored that way; GQA
(one answer) by exact match. Exact match: the normalised prediction equals the normalised most common answer.

Splits without public answers (VQAv2 test-dev / test, GQA test / challenge) are answered, not scored:
:func:`write_results` writes the official results file (the normalised predictions) for the evaluation server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.records import DataFormatError, iter_jsonl, load_image
from ..models import decoder_start_token_id

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "VQARow",
    "VQAReport",
    "load_vqa_jsonl",
    "load_vqa_rows",
    "score_predictions",
    "generate_answers",
    "evaluate_vqa",
    "default_prompt",
    "results_format",
    "write_results",
    "check_results_path",
    "write_folder_results",
]

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------- data
METRICS = ("vqa", "vqa_official", "exact")


@dataclass(frozen=True)
class VQARow:
    """One question: ``image`` (path or PIL image), ``question``, the human ``answers``, optional ``kind`` (the
    per-kind breakdown), the file's ``question_id`` and the ``metric`` that scores it: ``"vqa"`` (min(matches / 3,
    1); leave-one-out when asked), ``"vqa_official"`` (vqaEval's leave-one-out always: VQAv2 / OK-VQA files) or
    ``"exact"`` (normalised exact match with the one answer: GQA).

    ``predict_only=True`` marks a question without answers (a test split read with
    ``load_vqa_rows(..., require_answers=False)``): its ``answers`` must then be empty, it can only be written as a
    prediction (:func:`write_results`), and scoring it raises ValueError. Otherwise ``answers`` must be non-empty."""

    image: Any
    question: str
    answers: tuple[str, ...]
    kind: str | None = None
    source: str = ""
    question_id: int | str | None = None
    metric: str = "vqa"
    predict_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{self.source}: 'question' must be a non-empty string, got {self.question!r}")
        if self.predict_only:
            if self.answers:
                raise ValueError(f"{self.source}: a predict_only row holds no answers, got {self.answers!r}")
        elif not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"{self.source}: 'answers' must be a non-empty list of strings, got {self.answers!r} "
                             "(a question without answers is a predict_only row, for a results file only)")
        if self.metric not in METRICS:
            raise ValueError(f"{self.source}: metric must be one of {METRICS}, got {self.metric!r}")


def load_vqa_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[VQARow]:
    """Rows of a JSONL file: ``{"image": "rel/path.png", "question": "...", "answers": ["...", ...]}``
    (``"answer": "..."`` is accepted for one answer; ``"kind"`` optional). Images relative to ``image_root``
    (default: the file's folder); a row that does not parse raises ValueError naming file and line."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (rows to read), got {limit}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    for source, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: a row must be a JSON object with image, question, answers")
        answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
        if isinstance(answers, str):
            answers = [answers]
        if answers and isinstance(answers[0], dict):  # VQAv2 style [{"answer": ...}, ...]
            answers = [a.get("answer") for a in answers]
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{source}: 'image' must be a non-empty string path, got {image!r}")
        image_path = Path(image) if Path(image).is_absolute() else root / image
        if not image_path.exists():
            raise FileNotFoundError(f"{source}: image file {str(image_path)!r} does not exist")
        rows.append(VQARow(str(image_path), obj.get("question"), tuple(answers or ()), obj.get("kind"), source))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows (expected JSONL lines with image, question, answers)")
    return rows


FORMATS_HELP = (
    "the formats read are: our JSONL (one {\"image\", \"question\", \"answers\"} object per line); a VQAv2 / OK-VQA "
    "questions JSON ({\"questions\": [{\"image_id\", \"question\", \"question_id\"}, ...]}) with its annotations JSON "
    "given by --annotations; a GQA questions JSON ({\"<question id>\": {\"imageId\", \"question\", \"answer\"}, ...})"
)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{what} {path}: not valid JSON ({error}); {FORMATS_HELP}") from error


def _data_format(path: Path) -> tuple[str, Any]:
    """``(format, parsed JSON or None)`` of a data file, format one of ``jsonl``, ``vqav2``, ``gqa``."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError:  # several JSON lines, or not JSON at all
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            return "jsonl", None
        raise DataFormatError(f"{path}: neither a JSON file nor JSON lines; {FORMATS_HELP}") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not a UTF-8 text file ({error}); {FORMATS_HELP}") from error
    if isinstance(obj, dict) and "image" in obj and "question" in obj:
        return "jsonl", None  # a JSONL file of one row
    if isinstance(obj, dict) and isinstance(obj.get("questions"), list):
        return "vqav2", obj
    if isinstance(obj, dict) and "annotations" in obj:
        raise DataFormatError(f"{path}: is a VQAv2 / OK-VQA annotations file; give the questions file as --data and "
                              "this one as --annotations")
    if isinstance(obj, dict) and obj and all(isinstance(q, dict) and "imageId" in q and "question" in q
                                             for q in obj.values()):
        return "gqa", obj
    raise DataFormatError(f"{path}: not a VQA data file I know; {FORMATS_HELP}")


def _field(obj: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kinds) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        names = "/".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise DataFormatError(f"{where}: '{key}' must be a non-empty {names}, got {value!r}")
    return value


def _coco_image_finder(root: Path, subtype: str | None) -> Callable[[int], Path]:
    """``image_id -> path`` of a COCO image ``COCO_<subtype>_<12-digit id>.jpg`` in ``root`` or ``root/<subtype>``
    (test-dev2015 questions are on the test2015 images: ``COCO_test2015_...`` in ``test2015``); without ``subtype``
    (the questions file has no "data_subtype"), any ``*_<12-digit id>.jpg|png`` in ``root``."""
    if subtype is None:
        pattern = re.compile(r"_(\d{12})\.(jpg|jpeg|png)$", re.IGNORECASE)
        index = {}
        if root.is_dir():
            for entry in os.scandir(root):
                match = pattern.search(entry.name)
                if match:
                    index[int(match.group(1))] = Path(entry.path)

        def find(image_id: int) -> Path:
            if image_id not in index:
                raise FileNotFoundError(f"no image file *_{image_id:012d}.jpg in {root} (COCO images are named "
                                        "COCO_<split>_<12-digit image_id>.jpg; point --image-root at their folder)")
            return index[image_id]
        return find

    if subtype == "test-dev2015":  # a subset of test2015, shipped without images of its own
        subtype = "test2015"

    def find_named(image_id: int) -> Path:
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        for candidate in (root / name, root / subtype / name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"image {name} is neither in {root} nor in {root / subtype} (COCO images are named "
                                "COCO_<data_subtype>_<12-digit image_id>.jpg; point --image-root at their folder)")
    return find_named


def _vqav2_rows(path: Path, questions: dict, annotations: str | os.PathLike | None, root: Path,
                limit: int | None, require_answers: bool) -> list[VQARow]:
    if annotations is None and require_answers:
        raise ValueError(f"{path}: a VQAv2 / OK-VQA questions file holds no answers; give the annotations JSON of the "
                         "same split with --annotations (e.g. v2_mscoco_val2014_annotations.json) to score it, or "
                         "--results FILE to write the predictions in the official results format without scoring "
                         "(test-dev / test splits, which have no public annotations)")
    subtype = questions.get("data_subtype")
    find_image = _coco_image_finder(root, subtype if isinstance(subtype, str) and subtype else None)
    entries = questions["questions"][:limit] if limit is not None else questions["questions"]
    parsed = []
    for i, q in enumerate(entries):
        where = f"{path}: question {i}"
        parsed.append((_field(q, "question_id", (int, str), where), _field(q, "image_id", int, where),
                       _field(q, "question", str, where)))
    if annotations is None:
        return [VQARow(str(find_image(image_id)), question, (), None, f"{path}: question_id {qid}", question_id=qid,
                       metric="vqa_official", predict_only=True) for qid, image_id, question in parsed]
    ann_path = Path(annotations)
    ann_obj = _read_json(ann_path, "annotations file")
    if not isinstance(ann_obj, dict) or not isinstance(ann_obj.get("annotations"), list):
        raise DataFormatError(f"annotations file {ann_path}: expected {{\"annotations\": [{{\"question_id\", "
                              "\"image_id\", \"answers\": [{\"answer\": ...}, ...], \"answer_type\"}, ...]}")
    by_id = {}
    for i, ann in enumerate(ann_obj["annotations"]):
        by_id[_field(ann, "question_id", (int, str), f"{ann_path}: annotation {i}")] = ann
    missing = [qid for qid, _, _ in parsed if qid not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} of {len(parsed)} question ids of {path} have no annotation in {ann_path} "
                         f"(first: {missing[:3]}); give the questions and annotations files of the same split")
    rows = []
    for qid, image_id, question in parsed:
        ann, where = by_id[qid], f"{path}: question_id {qid}"
        if ann.get("image_id") != image_id:
            raise ValueError(f"{where}: image_id {image_id} in the questions file but {ann.get('image_id')!r} in "
                             f"{ann_path}; give the questions and annotations files of the same split")
        answers = _field(ann, "answers", list, f"{ann_path}: question_id {qid}")
        if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise DataFormatError(f"{ann_path}: question_id {qid}: 'answers' must be a non-empty list of "
                                  f"{{\"answer\": \"...\"}} objects, got {answers!r}")
        texts = tuple(a["answer"] for a in answers)
        kind = ann.get("answer_type")
        rows.append(VQARow(str(find_image(image_id)), question, texts, kind if isinstance(kind, str) else None,
                           where, question_id=qid, metric="vqa_official"))
    return rows


def _gqa_rows(path: Path, questions: dict, root: Path, limit: int | None, require_answers: bool) -> list[VQARow]:
    rows = []
    for qid, q in questions.items():
        where = f"{path}: question {qid}"
        if "answer" not in q and require_answers:
            raise ValueError(f"{where}: no 'answer' (GQA test / challenge questions are unanswered); use a split "
                             "with answers such as testdev_balanced_questions.json or val_balanced_questions.json to "
                             "score, or --results FILE to write the predictions for a submission without scoring")
        image_id = _field(q, "imageId", str, where)
        name = f"{image_id}.jpg"
        image = next((c for c in (root / name, root / "images" / name) if c.is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{where}: image {name} is neither in {root} nor in {root / 'images'} (point "
                                    "--image-root at the GQA images folder)")
        types = q.get("types")
        kind = types.get("structural") if isinstance(types, dict) else None
        answers = (_field(q, "answer", str, where),) if "answer" in q else ()
        rows.append(VQARow(str(image), _field(q, "question", str, where), answers,
                           kind if isinstance(kind, str) else None, where, question_id=qid, metric="exact",
                           predict_only=not answers))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_vqa_rows(path: str | os.PathLike, annotations: str | os.PathLike | None = None,
                  image_root: str | os.PathLike | None = None, limit: int | None = None,
                  require_answers: bool = True) -> list[VQARow]:
    """The first ``limit`` questions of a data file, its format read from its content:

    - our JSONL (:func:`load_vqa_jsonl`), scored with ``metric="vqa"``;
    - a VQAv2 / OK-VQA questions JSON plus its ``annotations`` JSON (the 10 human answers; ``kind`` = the
      annotation's ``answer_type``); images ``COCO_<data_subtype>_<12-digit image_id>.jpg``; ``"vqa_official"``;
    - a GQA questions JSON (``kind`` = ``types.structural``); images ``<imageId>.jpg``; ``"exact"``.

    Images are looked up in ``image_root`` (default: the file's folder) and, for COCO / GQA, in its
    ``<data_subtype>`` / ``images`` subfolder. A file of none of these formats, VQAv2 questions without annotations
    or with question ids the annotations lack raise ValueError; a missing image FileNotFoundError.

    ``require_answers=False`` (predictions only, for :func:`write_results`): a VQAv2 questions file without
    ``annotations`` (test-dev / test) and GQA questions without "answer" (test / challenge) become
    ``predict_only`` rows instead of an error. Our JSONL always needs answers."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (rows to read), got {limit}")
    path = Path(path)
    fmt, obj = _data_format(path)
    if annotations is not None and fmt != "vqav2":
        raise ValueError(f"--annotations is only for a VQAv2 / OK-VQA questions file, but {path} is a {fmt} file")
    if fmt == "jsonl":
        return load_vqa_jsonl(path, image_root, limit)
    root = Path(image_root) if image_root is not None else path.parent
    if fmt == "vqav2":
        rows = _vqav2_rows(path, obj, annotations, root, limit, require_answers)
    else:
        rows = _gqa_rows(path, obj, root, limit, require_answers)
    if not rows:
        raise ValueError(f"{path}: no questions in the file")
    return rows


# ------------------------------------------------------------------------------------------- generation
def default_prompt(processor: Any) -> str:
    """The question prompt for the processor's family: LLaVA ``USER: <image>\\n{question} ASSISTANT:``;
    processors that add the image tokens themselves (BLIP-2 / InstructBLIP) ``Question: {question} Short answer:``."""
    if hasattr(processor, "num_query_tokens"):
        return "Question: {question} Short answer:"
    return "USER: <image>\n{question} ASSISTANT:"


def _open_image(image: Any) -> Any:
    return load_image(image) if isinstance(image, (str, os.PathLike)) else image


@torch.no_grad()
def _check_image_tokens(model: Any, input_ids: torch.Tensor) -> None:
    """Every row must hold the model's image token: BLIP-2 / InstructBLIP silently ignore the image
    otherwise (and LLaVA needs one token per patch), so a processor that does not insert them is an error."""
    config = model.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        return
    missing = int((~(input_ids == token).any(dim=1)).sum())
    if missing:
        raise ValueError(
            f"{missing} of {input_ids.shape[0]} prompts hold no image token (id {token}) after the processor: "
            "the model would answer without looking at the image. Use the processor saved with the model "
            "(its image token must match the model's config)"
        )


def _right_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding (``mask == 0``) to its end, keeping the order of the real tokens: (B, L) each."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def _answer_tokens(model: Any, out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The new tokens in ``generate``'s output ``out`` (B, T) -> (B, T'), checked against what transformers
    5.x returns: a decoder-only language model (LLaVA; BLIP-2 / InstructBLIP with OPT / Llama) gives the prompt
    followed by the new tokens (T = L + n); an encoder-decoder one (Flan-T5) gives only the decoder's tokens,
    the decoder start token first (T = 1 + n)."""
    start = decoder_start_token_id(model)
    if start is not None:
        if not bool((out[:, 0] == start).all()):
            raise RuntimeError(f"encoder-decoder generate did not start with the decoder start token {start}: "
                               f"got {out[:, 0].tolist()}")
        return out[:, 1:]
    prompt_len = input_ids.shape[1]
    if out.shape[1] < prompt_len or not torch.equal(out[:, :prompt_len], input_ids):
        raise RuntimeError("decoder-only generate did not return the prompt before the answer (this code expects "
                           "transformers 5.x behaviour); cannot tell the answer tokens apart")
    return out[:, prompt_len:]


def generate_answers(model: Any, processor: Any, rows: Sequence[VQARow], batch_size: int = 32,
                     max_new_tokens: int = 5, prompt: str | None = None, progress: bool = False) -> list[str]:
    """Greedy answers to ``rows``; each answer is the decoded text of the new tokens up to EOS.

    Batches are padded as the language model needs, so that an answer does not depend on the batch: on the
    left for a decoder-only language model (generation appends on the right), on the right for an
    encoder-decoder one (the decoder starts fresh; right padding keeps the T5 encoder's relative positions as
    without padding). InstructBLIP's Q-Former instruction (``qformer_input_ids``) is always right-padded
    (the Q-Former has absolute positions), whatever its tokenizer's padding side.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    template = prompt if prompt is not None else default_prompt(processor)
    if "{question}" not in template:
        raise ValueError(f"prompt must contain '{{question}}', got {template!r}")
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if decoder_start_token_id(model) is not None else "left"
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress, leave=False):
            part = rows[start:start + batch_size]
            texts = [template.format(question=r.question) for r in part]
            inputs = processor(images=[_open_image(r.image) for r in part], text=texts, padding=True,
                               return_tensors="pt")
            inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                      for k, v in inputs.items()}
            if "qformer_input_ids" in inputs and "qformer_attention_mask" in inputs:
                inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = _right_pad(
                    inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
            _check_image_tokens(model, inputs["input_ids"])
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = _answer_tokens(model, out, inputs["input_ids"])
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


@dataclass
class VQAReport:
    """Scores of one evaluation; ``per_kind`` maps a question kind to its accuracy when rows have kinds;
    ``metric`` names how ``accuracy`` was scored (``"vqa"``, ``"vqa_official"``, ``"exact"``, or several joined by
    "+" for a mix of rows)."""

    accuracy: float
    exact_match: float
    num: int
    per_kind: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)
    metric: str = "vqa"

    def to_dict(self, with_predictions: bool = True) -> dict:
        out = {"accuracy": self.accuracy, "metric": self.metric, "exact_match": self.exact_match, "num": self.num,
               "per_kind": self.per_kind, "seconds": round(self.seconds, 3)}
        if with_predictions:
            out["predictions"] = self.predictions
        return out

    def save(self, path: str | os.PathLike) -> Path:
        from .._io import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)

        atomic_write(path, write)
        return Path(path)


def _row_metric(row: VQARow, leave_one_out: bool) -> str:
    return "vqa_official" if row.metric == "vqa" and leave_one_out else row.metric


def score_predictions(rows: Sequence[VQARow], predictions: Sequence[str], leave_one_out: bool = False) -> VQAReport:
    """Score ``predictions`` (one per row) into a :class:`VQAReport`, each row by its ``metric`` (``"vqa"`` rows
    with the official leave-one-out form when ``leave_one_out``); logs one warning counting the VQA-scored rows
    with fewer than 3 answers (their accuracy cannot exceed ``n / 3``)."""
    if len(rows) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(rows)} rows")
    if not rows:
        raise ValueError("nothing to score: no rows")
    unanswered = [row for row in rows if row.predict_only]
    if unanswered:
        raise ValueError(f"{len(unanswered)} of {len(rows)} rows have no answers to score against (first: "
                         f"{unanswered[0].source}); questions without answers (VQAv2 test-dev / test, GQA test) can "
                         "only be written as predictions: write_results / `vlmsparse eval --results FILE`")
    few = Counter(len(row.answers) for row in rows if len(row.answers) < 3 and row.metric != "exact")
    if few:
        counts = ", ".join(f"{num} with {n} answer{'s' * (n != 1)}" for n, num in sorted(few.items()))
        logger.warning("%d of %d rows have fewer than 3 answers (%s): VQA accuracy caps at n/3 for a row with n "
                       "answers", sum(few.values()), len(rows), counts)
    records, by_kind, metrics = [], {}, []
    for row, pred in zip(rows, predictions):
        metric = _row_metric(row, leave_one_out)
        match = exact_match(pred, row.answers)
        acc = match if metric == "exact" else vqa_accuracy(pred, row.answers, metric == "vqa_official")
        image = str(row.image) if isinstance(row.image, (str, os.PathLike)) else None
        records.append({"question_id": row.question_id, "image": image, "question": row.question, "prediction": pred,
                        "answers": list(row.answers), "accuracy": acc, "exact_match": match, "kind": row.kind})
        if row.kind is not None:
            by_kind.setdefault(row.kind, []).append(acc)
        if metric not in metrics:
            metrics.append(metric)
    n = len(records)
    return VQAReport(
        accuracy=sum(r["accuracy"] for r in records) / n,
        exact_match=sum(r["exact_match"] for r in records) / n,
        num=n,
        per_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        predictions=records,
        metric="+".join(metrics),
    )


def evaluate_vqa(model: Any, processor: Any, rows: Iterable[VQARow], batch_size: int = 32, max_new_tokens: int = 5,
                 prompt: str | None = None, leave_one_out: bool = False, progress: bool = False) -> VQAReport:
    """Generate answers for ``rows`` and score them (VQA accuracy, exact match, per kind)."""
    rows = list(rows)
    start = time.perf_counter()
    predictions = generate_answers(model, processor, rows, batch_size, max_new_tokens, prompt, progress)
    report = score_predictions(rows, predictions, leave_one_out)
    report.seconds = time.perf_counter() - start
    return report


def evaluate_folder(model_dir: str | os.PathLike, data: str | os.PathLike, batch_size: int = 32,
                    max_new_tokens: int = 5, prompt: str | None = None, limit: int | None = None,
                    image_root: str | None = None, leave_one_out: bool = False, progress: bool = True,
                    annotations: str | os.PathLike | None = None) -> VQAReport:
    """Load a model folder (Hugging Face files; a pruned or finetuned folder loads the same way) with its
    processor and evaluate it on a data file of any format :func:`load_vqa_rows` reads (read first, so that a
    bad file fails before the model loads)."""
    rows = load_vqa_rows(data, annotations, image_root, limit)
    model, processor = _load_vqa_model(model_dir)
    return evaluate_vqa(model, processor, rows, batch_size, max_new_tokens, prompt, leave_one_out, progress)


def _load_vqa_model(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    model, processor = load_model_folder(model_dir)
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{model_dir}: no image processor saved in the folder (a VQA evaluation needs "
                         "processor_config.json / preprocessor_config.json beside the model)")
    return model, processor


def load_model_folder(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder saved with ``save_pretrained`` (eval mode): the model class
    chosen by its ``model_type`` (:func:`vlmsparse.pipeline.save.load_model`); the processor, else the
    tokenizer, saved beside it (None when neither is there)."""
    from ..pipeline.save import load_model, load_processor

    return load_model(model_dir), load_processor(model_dir)


# ------------------------------------------------------------------------------------- results files
RESULTS_FORMATS = {"vqa_official": "vqav2", "exact": "gqa"}


def results_format(rows: Sequence[VQARow]) -> str:
    """``"vqav2"`` for rows of a VQAv2 / OK-VQA questions file, ``"gqa"`` for a GQA one (read by
    :func:`load_vqa_rows`, which sets their ``metric``); anything else (our JSONL, a mix) raises ValueError."""
    metrics = sorted({row.metric for row in rows})
    if len(metrics) != 1 or metrics[0] not in RESULTS_FORMATS:
        raise ValueError(f"a results file is written for the questions of one VQAv2 / OK-VQA or GQA questions file "
                         f"(rows with metric 'vqa_official' or 'exact'), got rows with metric {metrics}; our JSONL "
                         "has no official question ids (use -o for a report with every prediction)")
    missing = [row.source for row in rows if row.question_id is None]
    if missing:
        raise ValueError(f"{len(missing)} rows have no question_id (first: {missing[0]}); a results file needs one "
                         "per question")
    return RESULTS_FORMATS[metrics[0]]


def check_results_path(path: str | os.PathLike, overwrite: bool = False,
                       inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse a results ``path`` that is a folder, one of the ``inputs`` files, or an existing file unless
    ``overwrite`` (ValueError / FileExistsError); returns it as a Path."""
    from ..pipeline.guards import check_output_file

    return check_output_file(path, list(inputs), overwrite, "--results")


def write_results(rows: Sequence[VQARow], predictions: Sequence[str], path: str | os.PathLike,
                  overwrite: bool = False, fill_from: str | os.PathLike | None = None) -> Path:
    """Write ``predictions`` (one per row, in row order) as the official results file of the rows' questions,
    each answer passed through :func:`normalize_answer` (as LLaVA's / LAVIS's answer processors do before
    submitting):

    - VQAv2 / OK-VQA (EvalAI; vqaTools ``loadRes``): ``[{"question_id": 262148000, "answer": "yes"}, ...]``;
    - GQA (submission): ``[{"questionId": "20968495", "prediction": "no"}, ...]``.

    Rows may be ``predict_only`` (no answers). Written atomically (temporary file, then rename); an existing file is
    refused unless ``overwrite``. Raises ValueError for rows of no results format (see :func:`results_format`),
    a count mismatch or a repeated question id.

    ``fill_from`` (VQAv2 only): a questions JSON whose every question must be in the file, e.g. the test2015
    questions for a test-dev run (the EvalAI server takes the whole test2015 set); the questions not answered here
    get ``"answer": ""``, as LLaVA's submission script does. A row whose id it lacks raises ValueError."""
    if len(rows) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(rows)} rows")
    fmt = _check_results_rows(rows)
    path = check_results_path(path, overwrite)
    _write_results(path, rows, predictions, fmt, _filling(rows, fmt, fill_from))
    return path


def _check_results_rows(rows: Sequence[VQARow]) -> str:
    """The results format of ``rows`` (:func:`results_format`) after checking there are some and that no question
    id repeats."""
    if not rows:
        raise ValueError("nothing to write: no rows")
    fmt = results_format(rows)
    ids = Counter(row.question_id for row in rows)
    repeated = [qid for qid, n in ids.items() if n > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} question ids occur more than once (first: {repeated[:3]}); a results file "
                         "holds one prediction per question")
    return fmt


def _filling(rows: Sequence[VQARow], fmt: str, fill_from: str | os.PathLike | None) -> list[dict]:
    """The records ``fill_from`` adds to the results of ``rows`` (none without it): ``{"question_id": id,
    "answer": ""}`` for each question of that VQAv2 questions file that ``rows`` do not answer."""
    if fill_from is None:
        return []
    if fmt != "vqav2":
        raise ValueError("fill_from (--fill-questions) is for VQAv2 / OK-VQA results, not GQA")
    questions_path = Path(fill_from)
    answered = {row.question_id for row in rows}
    file_fmt, obj = _data_format(questions_path)
    if file_fmt != "vqav2":
        raise ValueError(f"{questions_path}: the questions to fill from must be a VQAv2 questions JSON, got {file_fmt}")
    every = [_field(q, "question_id", int, f"{questions_path}: questions[{i}]") for i, q in enumerate(obj["questions"])]
    unknown = sorted(answered - set(every))
    if unknown:
        raise ValueError(f"{len(unknown)} answered question ids are not in {questions_path} (first: {unknown[:3]}); "
                         "fill from the questions file of the split they belong to (test2015 for test-dev)")
    return [{"question_id": qid, "answer": ""} for qid in every if qid not in answered]


def _write_results(path: Path, rows: Sequence[VQARow], predictions: Sequence[str], fmt: str,
                   filling: list[dict]) -> None:
    """Write the checked rows' results file (format ``fmt``, then ``filling``) atomically."""
    from .._io import atomic_write

    if fmt == "vqav2":
        records = [{"question_id": row.question_id, "answer": normalize_answer(pred)}
                   for row, pred in zip(rows, predictions)]
    else:
        records = [{"questionId": str(row.question_id), "prediction": normalize_answer(pred)}
                   for row, pred in zip(rows, predictions)]
    records += filling

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f)

    atomic_write(path, write)


def write_folder_results(model_dir: str | os.PathLike, data: str | os.PathLike, results: str | os.PathLike,
                         batch_size: int = 32, max_new_tokens: int = 5, prompt: str | None = None,
                         limit: int | None = None, image_root: str | None = None, leave_one_out: bool = False,
                         progress: bool = True, annotations: str | os.PathLike | None = None,
                         overwrite: bool = False, fill_from: str | os.PathLike | None = None
                         ) -> tuple[int, VQAReport | None]:
    """Answer every question of a VQAv2 / OK-VQA or GQA questions file (the first ``limit``) with a model folder
    and write the official results file ``results`` (:func:`write_results`); answers are not needed. When every
    question has answers (VQAv2 with ``annotations``, GQA testdev / val), the predictions are also scored.
    The file, the path, the format and ``fill_from`` are checked before the model loads. Returns ``(questions written,
    report or None when unscored)``."""
    rows = load_vqa_rows(data, annotations, image_root, limit, require_answers=False)
    fmt = _check_results_rows(rows)
    path = check_results_path(results, overwrite, [data, annotations, fill_from])
    filling = _filling(rows, fmt, fill_from)  # a bad fill file fails here, not after every answer is generated
    model, processor = _load_vqa_model(model_dir)
    start = time.perf_counter()
    predictions = generate_answers(model, processor, rows, batch_size, max_new_tokens, prompt, progress)
    _write_results(check_results_path(path, overwrite), rows, predictions, fmt, filling)
    if any(row.predict_only for row in rows):
        return len(rows), None
    report = score_predictions(rows, predictions, leave_one_out)
    report.seconds = time.perf_counter() - start
    return len(rows), report
