""":func:`prune_model` (layer 5, part of :mod:`vlmsparse.pipeline.prune`): checks, then stage by stage and block
by block the statistics, the pruning of each block's targets and the next block's inputs; restores the weights
changed so far when anything fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields, replace
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import increment_version

from ...kernels import cpu_gemm
from ...masks import MaskSet
from ...models import get_arch_spec
from ...pruning import InputStats, check_weight, prune_layer, sparsegpt_prune
from ...pruning.stats import ERROR_SAMPLE_TOKENS
from .capture import _advance, _capture, _check_batches
from .owl import _apply_owl
from .placement import WeightSource, _model_device, _Onload, _visit
from .plan import PruneConfig, _check_arrived, _plan, _Target
from .report import LayerReport
from .statistics import _collect_stats

log = logging.getLogger(__name__)


def prune_model(
    model: nn.Module,
    method: str = "wanda",
    sparsity: Any = 0.5,
    allocation: Any = "equal",
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    weights: WeightSource | None = None,
    **options: Any,
) -> MaskSet:
    """Prune ``model`` in place and return its :class:`~vlmsparse.masks.MaskSet`.

    ``calibration``: an iterable of model-input dicts (``input_ids``, ``attention_mask``, ``pixel_values``,
    ...), each one batch; not needed for magnitude pruning without OWL. ``options``: the other fields of
    :class:`PruneConfig` (``scope``, ``owl``, ``blocksize``, ``dampening``, ``report_error``, ``offload``...).
    The per-layer report is in ``masks.info["report"]`` (JSON; see :func:`report_of`), and which tokens its errors
    cover in ``masks.info["error_over"]`` (see ``report_error`` in :class:`PruneConfig`). A block the model's
    forward skips on every calibration batch (Mllama's cross-attention layers on text without ``pixel_values``)
    gets no inputs: Wanda / SparseGPT leave its linears dense, with a warning, and list it in
    ``masks.info["not_pruned"]`` (:func:`~vlmsparse.pipeline.prune.not_pruned_of`); magnitude, which needs no
    inputs, prunes it.
    ``device``: run there, moving one block at a time (see :class:`PruneConfig`). ``weights``: for a model built
    on the meta device, where its weights come from and go to (e.g. streamed from safetensors shards:
    :func:`vlmsparse.pipeline.stream.prune_streamed`); needs ``device``.
    """
    known = {f.name for f in fields(PruneConfig)} - {"method", "sparsity", "allocation"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"prune_model: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    if isinstance(calibration, Mapping):
        raise TypeError("prune_model: calibration is one batch (a dict of model inputs); pass an iterable of "
                        "batches, e.g. [batch]")
    cfg = PruneConfig(method=method, sparsity=sparsity, allocation=allocation, **options)
    if weights is not None and cfg.device is None:
        raise ValueError("prune_model: weights (a source of streamed weights) needs device, the execution device "
                         "each block visits (e.g. device='cuda')")
    if weights is not None and cfg.restore_on_error:  # the source never changes: nothing to restore, and the
        cfg = replace(cfg, restore_on_error=False)    # copies would hold every pruned weight in host memory
    spec = get_arch_spec(model)
    stages = spec.resolve(model)
    plan = _plan(spec, stages, cfg)
    for _, per_block in plan:
        for targets in per_block:
            for t in targets:
                if not t.module.weight.is_meta:  # else when its block arrives on the device
                    check_weight(t.module.weight.detach(), t.pattern, t.name)
                    t.checked = True
    batches = list(calibration) if calibration is not None else []
    if cfg.needs_calibration or batches:
        _check_batches(spec, model, batches)
    if cfg.needs_calibration:
        _check_images(spec, plan, batches)
    device = torch.device(cfg.device) if cfg.device is not None else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"PruneConfig.device: got {cfg.device!r}, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    onload = _Onload(model, stages, device, weights) if cfg.device is not None else None
    offload = cfg.offload if cfg.offload is not None else device.type != "cpu"
    store = torch.device("cpu") if offload else None
    hessian = cfg.method == "sparsegpt"  # SparseGPT's X^T X also gives its error over every token
    sample = ERROR_SAMPLE_TOKENS if cfg.report_error and batches and not hessian else 0

    masks = MaskSet(method=cfg.method)
    report: list[LayerReport] = []
    dense: list[dict] = []  # blocks whose targets stay dense: no calibration batch reaches them
    backups: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    # float32 GEMMs on the CPU (the calibration forwards) through oneDNN where it measures faster (kernels.cpu_gemm)
    on_cpu = device.type == "cpu"
    gemm = "onednn" if on_cpu and cpu_gemm.use_onednn() else "torch"
    try:
        with torch.no_grad(), cpu_gemm.onednn_linears(model) if on_cpu else contextlib.nullcontext():
            if cfg.use_owl:
                _apply_owl(model, plan, batches, device, store, cfg, onload)
            # propagate="dense": every stage's inputs come from the dense model, so capture them before any pruning
            early = [_capture(model, stage, batches, device, store, onload)
                     if cfg.propagate == "dense" and _needs_data(stage, cfg, batches) else None for stage, _ in plan]
            for i, (stage, per_block) in enumerate(plan):
                captured, early[i] = early[i], None  # freed as the stage ends
                _prune_stage(model, stage, per_block, batches, device, store, cfg, hessian, sample, masks, report,
                             backups, onload, dense, captured)
                del captured
    except BaseException:
        with torch.no_grad():
            modules = dict(model.named_modules())
            for name, weight in backups.items():
                modules[name].weight.copy_(weight)
        log.error("pruning failed; restored the %d weights changed so far", len(backups))
        raise
    finally:
        model.train(was_training)
    total = time.perf_counter() - start
    masks.info.update(
        method=cfg.method,
        allocation=json.dumps(cfg.allocation if isinstance(cfg.allocation, str) else dict(cfg.allocation),
                              default=str),
        sparsity=str(cfg.sparsity),
        architecture=spec.name,
        stages=spec.describe(model),  # which blocks each part was (for a structural spec: what it found)
        seconds=f"{total:.3f}",
        calibration_batches=str(len(batches)),
        gemm=gemm,
        report=json.dumps([asdict(r) for r in report]),
    )
    if dense:
        masks.info["not_pruned"] = json.dumps(dense)
    if any(r.error is not None for r in report):
        masks.info["error_over"] = ("every calibration token" if hessian else
                                    f"the first whole calibration sequences reaching {sample} tokens (all, when fewer)")
    log.info("pruned %d linears of %s with %s in %.1f s (overall sparsity %.4f)", len(masks), spec.name,
             cfg.method, total, masks.sparsity())
    return masks


def _check_images(spec, plan, batches: list) -> None:
    """ValueError when a stage other than language is pruned with calibration and a batch has no
    ``pixel_values``: a text-only batch never reaches the vision tower or the connector."""
    parts = sorted({stage.part for stage, _ in plan} - {"language"})
    text = [i for i, batch in enumerate(batches) if "pixel_values" not in batch]
    if parts and text:
        raise ValueError(f"calibration batch {text[0]} has no pixel_values (text only), so it cannot calibrate the "
                         f"{', '.join(parts)} part(s) of {spec.name}; prune the language part alone "
                         "(allocation='language', or leave those parts dense at 0) or give image-text batches")


def _needs_data(stage, cfg: PruneConfig, batches: list) -> bool:
    """Whether pruning ``stage`` runs the calibration batches: Wanda / SparseGPT, and magnitude for its error,
    which it reports only where every batch reaches the stage (text never reaches the vision tower)."""
    reached = stage.part == "language" or all("pixel_values" in b for b in batches)
    return cfg.method != "magnitude" or (cfg.report_error and bool(batches) and reached)


def _prune_stage(model, stage, per_block, batches, device, store, cfg, hessian: bool, sample_tokens: int, masks,
                 report, backups, onload: _Onload | None = None, dense: list[dict] | None = None,
                 captured: list | None = None) -> None:
    """Prune one stage block by block. ``hessian``, ``sample_tokens``: those of each ``InputStats``.
    ``captured``: the stage's block inputs, captured already (the ``propagate="dense"`` order); else captured
    here, from the model as pruned so far."""
    blocks = _progress(list(zip(stage.blocks, per_block)), f"prune {stage.part}", cfg.progress, len(per_block))
    if not _needs_data(stage, cfg, batches):
        for block, targets in blocks:
            if targets:
                with _visit(onload, block):
                    _check_arrived(targets)
                    _backup(targets, backups, cfg)
                    _prune_block(targets, {}, {}, cfg, masks, report)
        return
    if captured is None:
        captured = _capture(model, stage, batches, device, store, onload)
    last = len(stage.blocks) - 1
    for index, (block, targets) in enumerate(blocks):
        if not any(b.reaches(index) for b in captured):  # the model's forward skips it: its inputs pass on
            if targets:
                _prune_unreached(stage, index, block, targets, cfg, masks, report, backups, onload, dense)
            continue
        if not targets and index == last:
            continue
        with _visit(onload, block):
            outputs = None
            if targets:
                _check_arrived(targets)
                keep = cfg.propagate == "dense" and index < last  # the dense outputs are the next block's inputs
                stats, group_of, outputs = _collect_stats(block, index, targets, captured, device, hessian,
                                                          sample_tokens, keep, store)
                _backup(targets, backups, cfg)
                _prune_block(targets, stats, group_of, cfg, masks, report)
                del stats
            if outputs is not None:
                for b, out in zip(captured, outputs):
                    b.hidden = out
            elif index < last:
                _advance(block, index, captured, device, store)


UNREACHED = ("the model's forward skips this block on every calibration batch (e.g. Mllama's cross-attention "
             "layers on text without pixel_values), so no inputs calibrate it")


def _prune_unreached(stage, index, block, targets, cfg, masks, report, backups, onload, dense) -> None:
    """A block no calibration batch reaches: magnitude (no inputs needed) prunes it; Wanda / SparseGPT leave it
    dense, logged and listed in ``dense``. (Text cannot stand in for the inputs it would get: a cross-attention
    block's keys / values read the image states, and its text-side inputs come from a forward with an image.)"""
    name = stage.block_names[index]
    if cfg.method == "magnitude":
        with _visit(onload, block):
            _check_arrived(targets)
            _backup(targets, backups, cfg)
            _prune_block(targets, {}, {}, cfg, masks, report)
        return
    log.warning("%s: %s; its %d linears stay dense (%s needs their inputs: calibrate with image-text batches to "
                "prune them)", name, UNREACHED, len(targets), cfg.method)
    if dense is not None:
        dense.append({"block": name, "part": stage.part, "linears": [t.name for t in targets], "reason": UNREACHED})


def _prune_block(
    targets: list[_Target], stats: dict[str, InputStats], group_of: dict[str, int], cfg: PruneConfig,
    masks: MaskSet, report: list[LayerReport],
) -> None:
    results: dict[str, tuple] = {}
    if cfg.method == "sparsegpt" and cfg.stack_shared:
        groups: dict[tuple, list[_Target]] = {}
        for t in targets:
            groups.setdefault((group_of.get(t.name), t.pattern), []).append(t)
        for (gid, pattern), members in groups.items():
            if gid is None or len(members) < 2:
                continue
            start = time.perf_counter()
            st = stats[members[0].name]
            weights = [m.module.weight.detach() for m in members]
            stacked = torch.cat(weights, dim=0)
            new, keep = sparsegpt_prune(stacked, st.hessian(), pattern, cfg.blocksize, cfg.dampening,
                                        segments=[w.shape[0] for w in weights])
            seconds = (time.perf_counter() - start) / len(members)
            row = 0
            for m, w in zip(members, weights):
                rows = w.shape[0]
                part_new, part_keep = new[row:row + rows], keep[row:row + rows]
                row += rows
                results[m.name] = (part_new, part_keep, st.reconstruction_error(w, part_new), seconds)
    for t in targets:
        if t.name in results:
            continue
        start = time.perf_counter()
        st = stats.get(t.name)
        method = cfg.method
        if st is None and method != "magnitude":
            log.warning("%s received no calibration inputs (unused in the forward pass); pruned by magnitude", t.name)
            method = "magnitude"
        res = prune_layer(
            t.module.weight.detach(), st if method != "magnitude" else None, method, t.pattern,
            scope=t.scope, blocksize=cfg.blocksize, dampening=cfg.dampening,
        )
        error = res.error
        if method == "magnitude" and st is not None:
            error = st.reconstruction_error(t.module.weight.detach(), res.weight)
        results[t.name] = (res.weight, res.mask, error, time.perf_counter() - start)
    for t in targets:  # the model's order
        _store(t, *results[t.name], masks, report)


def _store(t: _Target, new: torch.Tensor, keep: torch.Tensor, error: float | None, seconds: float,
           masks: MaskSet, report: list[LayerReport]) -> None:
    _set_weight(t.module.weight, new)
    masks.masks[t.name] = keep.detach().to("cpu")
    masks.patterns[t.name] = str(t.pattern)
    sparsity = 1.0 - int(torch.count_nonzero(keep)) / keep.numel()  # bool sum: 4x slower
    report.append(LayerReport(t.name, t.part, tuple(keep.shape), str(t.pattern), sparsity, error, seconds))
    log.debug("pruned %s to %s (sparsity %.4f, error %s)", t.name, t.pattern, sparsity, error)


def _set_weight(weight: nn.Parameter, new: torch.Tensor) -> None:
    """``weight`` takes ``new``'s values. ``new`` becomes its storage (the Parameter object stays, so tied weights
    stay tied) instead of being copied in: the loaded weights may be pages of the checkpoint file mapped copy-on-
    write, and the first write to each page faults; copying SmolLM2-135M's pruned linears in took 0.7-0.9 s of a
    7-8 s Wanda run (2 CPU threads). The version counter is raised as a copy would (streamed pruning saves the
    weights whose version changed)."""
    with torch.no_grad():
        if new.shape != weight.shape or new.dtype != weight.dtype or new.device != weight.device:
            weight.copy_(new)
            return
        fresh = new.contiguous()
        if fresh._base is not None or fresh.data_ptr() == weight.data_ptr():  # a view, or the weight itself
            fresh = fresh.clone()
        weight.data = fresh
        increment_version(weight)


def _backup(targets: list[_Target], backups: dict[str, torch.Tensor], cfg: PruneConfig) -> None:
    if not cfg.restore_on_error:
        return
    for t in targets:
        backups[t.name] = t.module.weight.detach().to("cpu", copy=True)


def _progress(iterable, desc: str, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
