"""Calibration batches and block inputs (layer 5, part of :mod:`vlmsparse.pipeline.prune`): checking the
batches, capturing the inputs of a stage's first block (all positional and keyword arguments, caches dropped,
``use_cache=False``) by running the model until it reaches that block, and running one block on them. A text-only
batch of a model whose forward needs an image (BLIP-2, InstructBLIP) runs its language model alone
(:meth:`~vlmsparse.models.ArchSpec.calibration_call`). Where each block's arguments are captured, a block the
model's forward does not call for a batch (Mllama's cross-attention layers without an image) is skipped for that
batch in the sequential pass as well: its inputs pass on unchanged (:meth:`_Batch.reaches`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...models import ArchSpec, ResolvedStage, get_arch_spec
from .placement import _move, _Onload

_CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past")


@dataclass
class _Batch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool
    token_mask: torch.Tensor | None
    per_block: list | None = None  # (args, kwargs) per block when kwargs cannot be reused; None: a block not called
    tail_mask: torch.Tensor | None = None  # the mask of the stage sequence's tail (StageSpec.masked_tail)
    contexts: dict = field(default_factory=dict)  # block argument name -> token mask of that sequence (or None)
    hidden_key: str = "hidden_states"  # the keyword of the hidden states when hidden_in_kwargs

    def reaches(self, index: int) -> bool:
        """Whether the model's forward calls block ``index`` on this batch (else it skips it: the block's inputs
        are the next block's inputs). Known only where each block's arguments were captured (``per_block``)."""
        return self.per_block is None or self.per_block[index] is not None


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _is_cache(obj: Any) -> bool:
    return type(obj).__name__.endswith("Cache")  # transformers' DynamicCache, EncoderDecoderCache, ...


def _clean_args(args: tuple) -> tuple:
    return tuple(None if _is_cache(a) else a for a in args)


def _clean_kwargs(kwargs: dict) -> dict:
    """Block keyword arguments without KV caches: with a cache, every batch would attend to the ones before."""
    out = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    for key in _CACHE_KEYS:
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _arguments(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of ``block`` by parameter name (positional ones included)."""
    try:
        return dict(inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def _run_model(spec: ArchSpec, model: nn.Module, batch: Mapping, device: torch.device) -> None:
    module, inputs = spec.calibration_call(model, dict(batch))
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    inputs.setdefault("use_cache", False)
    module(**inputs)


def _check_batches(spec: ArchSpec, model: nn.Module, batches: list) -> None:
    if not batches:
        raise ValueError("calibration set is empty; give at least one batch of model inputs")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__}; expected a dict of model inputs")
        if "input_ids" not in batch and "pixel_values" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"calibration batch {i} has none of input_ids / pixel_values / inputs_embeds")
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"calibration batch {i}: {key} holds NaN/inf values")
        try:
            spec.check_inputs(model, batch)
        except ValueError as error:
            raise ValueError(f"calibration batch {i}: {error}") from None


def _capture(
    model: nn.Module, stage: ResolvedStage, batches: list, device: torch.device, store: torch.device | None,
    onload: _Onload | None = None, spec: ArchSpec | None = None,
) -> list[_Batch]:
    """Inputs of the stage's first block (and of every block when kwargs cannot be reused), per batch. With
    ``onload``, the modules the forward calls visit ``device`` while needed (:meth:`_Onload.on_call`).
    ``spec``: the model's (default :func:`~vlmsparse.models.get_arch_spec`)."""
    spec = spec if spec is not None else get_arch_spec(model)
    with onload.on_call() if onload is not None else nullcontext():
        return _capture_batches(spec, model, stage, batches, device, store)


def _capture_batches(
    spec: ArchSpec, model: nn.Module, stage: ResolvedStage, batches: list, device: torch.device,
    store: torch.device | None,
) -> list[_Batch]:
    blocks = stage.blocks
    all_blocks = not stage.spec.reuse_kwargs and len(blocks) > 1
    captured: list[_Batch] = []
    for batch in batches:
        calls: dict[int, tuple[tuple, dict]] = {}  # block index -> its (first) call's arguments

        def make_pre_hook(index: int, _calls=calls):
            def pre_hook(module, call_args, call_kwargs):
                _calls.setdefault(index, (call_args, call_kwargs))
                if not all_blocks:
                    raise _Stop
            return pre_hook

        def last_hook(module, args, output):
            raise _Stop

        handles = [b.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True, prepend=True)  # before an onload
                   for i, b in enumerate(blocks if all_blocks else blocks[:1])]
        if all_blocks:
            handles.append(blocks[-1].register_forward_hook(last_hook))
        try:
            with torch.no_grad():
                _run_model(spec, model, batch, device)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if not calls:
            raise RuntimeError(f"calibration forward never reached {stage.block_names[0]}")
        # the first block the forward called: the stage's inputs (the blocks it skipped before it pass them on)
        first = min(calls)
        memo: dict = {}
        entries: dict[int, tuple] = {}
        # the hidden states' keyword when given by keyword: hidden_states, or e.g. hidden_state (Mllama's vision
        # encoder in transformers 5.17), else the first forward parameter the call names
        given = calls[first][1]
        params = [p for p in inspect.signature(blocks[first].forward).parameters if p in given]
        hidden_key = next((k for k in given if k.startswith("hidden_state")), params[0] if params else "hidden_states")
        for index, (args, kwargs) in sorted(calls.items()):
            kwargs, args = _clean_kwargs(kwargs), _clean_args(args)
            if args:
                hidden, rest, in_kwargs = args[0], tuple(args[1:]), False
            else:
                hidden, rest, in_kwargs = kwargs.pop(hidden_key), (), True
            entries[index] = (hidden, _move(rest, store, memo), _move(kwargs, store, memo), in_kwargs)
        hidden, rest, kwargs, in_kwargs = entries[first]
        token_mask = tail_mask = None
        key = stage.spec.mask_key
        given = batch.get(key) if key else None
        if isinstance(given, torch.Tensor) and tuple(given.shape) == tuple(hidden.shape[:2]):
            token_mask = given.detach().bool().cpu()
        elif (isinstance(given, torch.Tensor) and stage.spec.masked_tail is not None and given.dim() == 2
              and given.shape[0] == hidden.shape[0] and given.shape[1] < hidden.shape[1]):
            tail_mask = given.detach().bool().cpu()
            lead = torch.ones(hidden.shape[0], hidden.shape[1] - given.shape[1], dtype=torch.bool)
            token_mask = torch.cat([lead, tail_mask], dim=1)
        contexts: dict[str, torch.Tensor | None] = {}
        if stage.spec.context_masks:
            bound = _arguments(blocks[first], *calls[first])
            for arg, ctx_key in stage.spec.context_masks:
                value, ctx_mask = bound.get(arg), batch.get(ctx_key)
                if not isinstance(value, torch.Tensor):
                    continue
                ok = isinstance(ctx_mask, torch.Tensor) and tuple(ctx_mask.shape) == tuple(value.shape[:2])
                contexts[arg] = ctx_mask.detach().bool().cpu() if ok else None  # never the stage's own mask
        captured.append(
            _Batch(
                hidden=_move(hidden.detach(), store),
                args=rest,
                kwargs=kwargs,
                hidden_in_kwargs=in_kwargs,
                hidden_key=hidden_key,
                token_mask=token_mask,
                tail_mask=tail_mask,
                per_block=([(entries[i][1], entries[i][2]) if i in entries else None for i in range(len(blocks))]
                           if all_blocks else None),
                contexts=contexts,
            )
        )
    return captured


def _run_block(block: nn.Module, index: int, b: _Batch, device: torch.device) -> torch.Tensor:
    """``block``'s outputs on ``b`` (a block the model's forward skips for ``b`` is never run: see ``reaches``)."""
    if not b.reaches(index):
        raise RuntimeError(f"block {index} is not called by the model's forward on this batch; it passes its "
                           "inputs on unchanged")
    args, kwargs = (b.per_block[index] if b.per_block is not None else (b.args, b.kwargs))
    memo: dict = {}
    hidden = b.hidden.to(device)
    args, kwargs = _move(args, device, memo), _move(kwargs, device, memo)
    if b.hidden_in_kwargs:
        out = block(*args, **{b.hidden_key: hidden}, **kwargs)
    else:
        out = block(hidden, *args, **kwargs)
    return _first(out)


def _advance(block: nn.Module, index: int, captured: list[_Batch], device: torch.device,
             store: torch.device | None) -> None:
    """Replace each batch's hidden states by ``block``'s outputs: the inputs of the next block (a batch whose
    forward skips ``block`` keeps its hidden states, as the model's own forward does)."""
    for b in captured:
        if not b.reaches(index):
            continue
        out = _run_block(block, index, b, device).detach()
        b.hidden = out.to(store) if store is not None else out
