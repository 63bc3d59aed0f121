"""Scores of predictions against question rows (:class:`VQAReport`), and generation followed by scoring."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._io import atomic_write
from .generation import generate_answers
from .metrics import exact_match, vqa_accuracy
from .rows import VQARow

__all__ = ["VQAReport", "score_predictions", "evaluate_vqa"]

logger = logging.getLogger(__name__)


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
