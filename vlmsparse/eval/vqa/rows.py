"""Question rows and the data files they are read from: our JSONL, VQAv2 / OK-VQA questions (+ annotations)
JSON with COCO images, GQA questions JSON (:func:`load_vqa_rows` tells them apart)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.records import DataFormatError, iter_jsonl
from .metrics import METRICS

__all__ = ["VQARow", "FORMATS_HELP", "load_vqa_jsonl", "load_vqa_rows", "data_format", "checked_field"]


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
    "given as annotations (--annotations); a GQA questions JSON ({\"<question id>\": {\"imageId\", \"question\", \"answer\"}, ...})"
)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{what} {path}: not valid JSON ({error}); {FORMATS_HELP}") from error


def data_format(path: Path) -> tuple[str, Any]:
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
        raise DataFormatError(f"{path}: is a VQAv2 / OK-VQA annotations file; give the questions file as data (--data) "
                              "and this one as annotations (--annotations)")
    if isinstance(obj, dict) and obj and all(isinstance(q, dict) and "imageId" in q and "question" in q
                                             for q in obj.values()):
        return "gqa", obj
    raise DataFormatError(f"{path}: not a VQA data file I know; {FORMATS_HELP}")


def checked_field(obj: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` after checking it is a non-empty value of ``kinds`` (DataFormatError naming ``where``)."""
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
                                        "COCO_<split>_<12-digit image_id>.jpg; point image_root (--image-root) at "
                                        "their folder)")
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
                                "COCO_<data_subtype>_<12-digit image_id>.jpg; point image_root (--image-root) at "
                                "their folder)")
    return find_named


def _vqav2_rows(path: Path, questions: dict, annotations: str | os.PathLike | None, root: Path,
                limit: int | None, require_answers: bool) -> list[VQARow]:
    if annotations is None and require_answers:
        raise ValueError(f"{path}: a VQAv2 / OK-VQA questions file holds no answers; give the annotations JSON of the "
                         "same split as annotations (--annotations; e.g. v2_mscoco_val2014_annotations.json) to "
                         "score it, or write the predictions in the official results format without scoring "
                         "(write_folder_results, --results FILE) "
                         "(test-dev / test splits, which have no public annotations)")
    subtype = questions.get("data_subtype")
    find_image = _coco_image_finder(root, subtype if isinstance(subtype, str) and subtype else None)
    entries = questions["questions"][:limit] if limit is not None else questions["questions"]
    parsed = []
    for i, q in enumerate(entries):
        where = f"{path}: question {i}"
        parsed.append((checked_field(q, "question_id", (int, str), where), checked_field(q, "image_id", int, where),
                       checked_field(q, "question", str, where)))
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
        by_id[checked_field(ann, "question_id", (int, str), f"{ann_path}: annotation {i}")] = ann
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
        answers = checked_field(ann, "answers", list, f"{ann_path}: question_id {qid}")
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
                             "score, or write the predictions for a submission without scoring "
                             "(write_folder_results, --results FILE)")
        image_id = checked_field(q, "imageId", str, where)
        name = f"{image_id}.jpg"
        image = next((c for c in (root / name, root / "images" / name) if c.is_file()), None)
        if image is None:
            raise FileNotFoundError(f"{where}: image {name} is neither in {root} nor in {root / 'images'} (point "
                                    "image_root (--image-root) at the GQA images folder)")
        types = q.get("types")
        kind = types.get("structural") if isinstance(types, dict) else None
        answers = (checked_field(q, "answer", str, where),) if "answer" in q else ()
        rows.append(VQARow(str(image), checked_field(q, "question", str, where), answers,
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
    fmt, obj = data_format(path)
    if annotations is not None and fmt != "vqav2":
        raise ValueError(f"annotations (--annotations) is only for a VQAv2 / OK-VQA questions file, but {path} is a "
                         f"{fmt} file")
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
