"""Input statistics of one block's target linears (layer 5, part of :mod:`vlmsparse.pipeline.prune`): the
calibration batches run through the block with hooks that accumulate an ``InputStats`` per input tensor (linears
reading the same tensor share one), padding skipped via the token masks.
"""

from __future__ import annotations

import torch
from torch import nn

from ...pruning import InputStats
from .capture import _arguments, _Batch, _run_block, _Stop
from .placement import _move
from .plan import _Target


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


def _collect_stats(
    block: nn.Module, index: int, targets: list[_Target], batches: list[_Batch], device: torch.device,
    hessian: bool, sample_tokens: int, keep_outputs: bool, store: torch.device | None,
) -> tuple[dict[str, InputStats], dict[str, int], list[torch.Tensor] | None]:
    """Run every batch through ``block``; return stats per group (``InputStats(in, hessian, sample_tokens=)``),
    group index per target, and the outputs
    (when ``keep_outputs``: the block's outputs before it is pruned, which the OWL pre-pass and
    ``propagate="dense"`` pass on). A batch whose forward skips ``block``
    (:meth:`_Batch.reaches`) adds no statistics and its output is its input."""
    group_of: dict[str, int] = {}
    stats: dict[int, InputStats] = {}
    outputs: list[torch.Tensor] | None = [] if keep_outputs else None
    state: dict = {}

    def make_hook(target: _Target):
        def hook(module, args):
            x = args[0]
            held = state["held"]
            key = _tensor_key(x)
            gid = group_of.get(target.name)
            if gid is None:  # first batch: group linears by the identity of their input tensor
                gid = state["ids"].get(key)
                if gid is None:
                    gid = len(stats)
                    stats[gid] = InputStats(x.shape[-1], hessian=hessian, sample_tokens=sample_tokens)
                    state["ids"][key] = gid
                group_of[target.name] = gid
            state["order"].append(target.name)
            if gid not in state["added"]:
                state["added"].add(gid)
                held.append(x)
                # a linear reading another sequence (cross-attention on the encoder output) gets that one's mask
                mask = state["tail_mask"] if target.reads_tail else state["context_keys"].get(key, state["mask"])
                if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                    mask = None
                stats[gid].add_batch(x.detach(), token_mask=mask)
            if target.name == state["stop_at"]:
                raise _Stop  # the rest of the block's forward is not needed for statistics

        return hook

    def block_hook(module, args, kwargs):  # identify the context tensors (as moved to the device) of this call
        if state["contexts"]:
            bound = _arguments(module, args, kwargs)
            for arg, mask in state["contexts"].items():
                value = bound.get(arg)
                if isinstance(value, torch.Tensor):
                    state["context_keys"][_tensor_key(value)] = mask

    handles = [t.module.register_forward_pre_hook(make_hook(t)) for t in targets]
    handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
    try:
        stop_at = None
        for b in batches:
            if not b.reaches(index):  # the model's forward skips the block for this batch: its inputs pass on
                if outputs is not None:
                    outputs.append(b.hidden)
                continue
            state.update(held=[], ids={}, added=set(), mask=b.token_mask, tail_mask=b.tail_mask, order=[],
                         stop_at=stop_at, contexts=b.contexts, context_keys={})
            try:
                out = _run_block(block, index, b, device)
            except _Stop:
                continue
            if outputs is not None:
                outputs.append(_move(out.detach(), store) if store is not None else out.detach())
            elif len(set(state["order"])) == len(targets):
                # after one full pass: later passes stop at the last target linear called
                stop_at = state["order"][-1]
    finally:
        for h in handles:
            h.remove()
        state.clear()
    return {t.name: stats[group_of[t.name]] for t in targets if t.name in group_of}, group_of, outputs
