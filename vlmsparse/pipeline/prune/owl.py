"""OWL (layer 5, part of :mod:`vlmsparse.pipeline.prune`): a dense pre-pass that measures each block's outlier
ratio and gives the block's targets their layer-wise sparsity (``pruning/owl.py`` holds the formulas).
"""

from __future__ import annotations

import logging

from ...pruning import InputStats, outlier_ratio, owl_sparsities
from ...sparsity import SparsityPattern
from .capture import _advance, _capture
from .placement import _Onload, _visit
from .plan import PruneConfig, _check_arrived, _Target
from .statistics import _collect_stats

log = logging.getLogger(__name__)


def _outlier_ratio(targets: list[_Target], stats: dict[str, InputStats], threshold: float) -> float:
    """OWL's outlier ratio of one block: the Wanda scores of all its linears together, one mean (as the reference)."""
    scores = [t.module.weight.detach().abs().float() * stats[t.name].norm.to(t.module.weight.device).unsqueeze(0)
              for t in targets]
    return outlier_ratio(scores, threshold)


def _apply_owl(model, plan, batches, device, store, cfg: PruneConfig, onload: _Onload | None = None) -> None:
    """Dense pre-pass: outlier ratio per block, then the block's targets get OWL sparsities (per part).

    A block without targets is run (the next block's inputs are its outputs, as in :func:`_prune_stage`) but gets
    no ratio: the sparsities spread around the target over the blocks that are pruned. A block the model's forward
    skips on every batch (Mllama's cross-attention layers on text) gets no ratio either and keeps the target."""
    for stage, per_block in plan:
        captured = _capture(model, stage, batches, device, store, onload)
        last = len(stage.blocks) - 1
        ratios = []
        unreached: set[int] = set()
        for index, (block, targets) in enumerate(zip(stage.blocks, per_block)):
            if not any(b.reaches(index) for b in captured):  # skipped by the forward on every batch: no ratio,
                unreached.add(index)                          # its inputs pass on (see driver._prune_unreached)
                continue
            if not targets:
                if index < last:
                    with _visit(onload, block):
                        _advance(block, index, captured, device, store)
                continue
            with _visit(onload, block):
                _check_arrived(targets)
                stats, _, outputs = _collect_stats(block, index, targets, captured, device, False, 0, True, store)
                ratios.append(_outlier_ratio(targets, stats, cfg.owl_threshold))
            for b, out in zip(captured, outputs):
                b.hidden = out
        pruned = [targets for index, targets in enumerate(per_block) if targets and index not in unreached]
        if not pruned:
            continue
        sparsities = owl_sparsities(ratios, pruned[0][0].pattern.sparsity, cfg.owl_lambda)
        for targets, s in zip(pruned, sparsities):
            for t in targets:
                t.pattern = SparsityPattern(round(s, 6))
        log.info("OWL %s sparsities: %s", stage.part, [round(s, 4) for s in sparsities])
