"""The official results files for evaluation servers: VQAv2 / OK-VQA (EvalAI) and GQA submissions, written
for splits with or without public answers (normalised predictions; written atomically)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..._io import atomic_write
from ...pipeline.guards import check_output_file
from .folders import load_vqa_model
from .generation import generate_answers
from .metrics import normalize_answer
from .rows import VQARow, checked_field, data_format, load_vqa_rows
from .scoring import VQAReport, score_predictions

__all__ = ["RESULTS_FORMATS", "results_format", "check_results_path", "write_results", "write_folder_results"]

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
                       inputs: Sequence[str | os.PathLike | None] = (), name: str = "results") -> Path:
    """Refuse a results ``path`` that is a folder, one of the ``inputs`` files, or an existing file unless
    ``overwrite`` (ValueError / FileExistsError; the messages call it ``name`` (--results), the caller's parameter);
    returns it as a Path."""
    return check_output_file(path, list(inputs), overwrite, f"{name} (--results)")


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
    path = check_results_path(path, overwrite, name="path")
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
    file_fmt, obj = data_format(questions_path)
    if file_fmt != "vqav2":
        raise ValueError(f"{questions_path}: the questions to fill from must be a VQAv2 questions JSON, got {file_fmt}")
    every = [checked_field(q, "question_id", int, f"{questions_path}: questions[{i}]") for i, q in enumerate(obj["questions"])]
    unknown = sorted(answered - set(every))
    if unknown:
        raise ValueError(f"{len(unknown)} answered question ids are not in {questions_path} (first: {unknown[:3]}); "
                         "fill from the questions file of the split they belong to (test2015 for test-dev)")
    return [{"question_id": qid, "answer": ""} for qid in every if qid not in answered]


def _write_results(path: Path, rows: Sequence[VQARow], predictions: Sequence[str], fmt: str,
                   filling: list[dict]) -> None:
    """Write the checked rows' results file (format ``fmt``, then ``filling``) atomically."""
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
    model, processor = load_vqa_model(model_dir)
    start = time.perf_counter()
    predictions = generate_answers(model, processor, rows, batch_size, max_new_tokens, prompt, progress)
    _write_results(check_results_path(path, overwrite), rows, predictions, fmt, filling)
    if any(row.predict_only for row in rows):
        return len(rows), None
    report = score_predictions(rows, predictions, leave_one_out)
    report.seconds = time.perf_counter() - start
    return len(rows), report
