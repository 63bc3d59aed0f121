"""The per-layer report of a pruning run (layer 5, part of :mod:`vlmsparse.pipeline.prune`): one
:class:`LayerReport` per pruned linear, stored as JSON in ``masks.info["report"]``; the blocks left dense because no
calibration batch reached them in ``masks.info["not_pruned"]`` (:func:`not_pruned_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ...masks import MaskSet


@dataclass
class LayerReport:
    """One row of the per-layer report."""

    name: str
    part: str
    shape: tuple[int, int]
    pattern: str
    sparsity: float
    error: float | None
    seconds: float


def report_of(masks: MaskSet) -> list[LayerReport]:
    """The per-layer report recorded by :func:`prune_model`."""
    rows = json.loads(masks.info.get("report", "[]"))
    return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in rows]


def not_pruned_of(masks: MaskSet) -> list[dict]:
    """The blocks :func:`prune_model` left dense because the model's forward skipped them on every calibration
    batch (Mllama's cross-attention layers on text without ``pixel_values``): dicts with ``block``, ``part``,
    ``linears`` (their names) and ``reason``; empty when every targeted block was pruned."""
    return json.loads(masks.info.get("not_pruned", "[]"))


def format_report(masks: MaskSet) -> str:
    """The per-layer report as a text table (name, part, shape, pattern, sparsity, error, seconds)."""
    rows = report_of(masks)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'part':<9} {'shape':>11} {'pattern':>8} {'sparsity':>8} {'error':>8} {'time s':>7}"]
    for r in rows:
        err = f"{r.error:.4f}" if r.error is not None else "-"
        shape = f"{r.shape[0]}x{r.shape[1]}"
        lines.append(f"{r.name:<{width}}  {r.part:<9} {shape:>11} {r.pattern:>8} {r.sparsity:>8.4f} {err:>8} "
                     f"{r.seconds:>7.3f}")
    lines.append(f"overall sparsity of pruned layers: {masks.sparsity():.4f}; method {masks.method}; "
                 f"{masks.info.get('seconds', '?')} s")
    if "error_over" in masks.info:
        lines.append(f"error: ||X (W - W')^T|| / ||X W^T|| over {masks.info['error_over']}")
    for row in not_pruned_of(masks):
        lines.append(f"left dense: {row['block']} ({len(row['linears'])} {row['part']} linears): {row['reason']}")
    if "stages" in masks.info:
        lines.append(f"architecture {masks.info.get('architecture', '?')}: {masks.info['stages']}")
    return "\n".join(lines)
