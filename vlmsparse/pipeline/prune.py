"""``prune_model``: prune a Hugging Face VLM (or causal LM) in place, block by block (layer 5).

Flow, per stage of the model (vision blocks, connector, language blocks; see ``vlmsparse.models``):

1. capture the inputs of the stage's first block (all positional and keyword arguments, caches dropped, with
   ``use_cache=False``) by running the model on each calibration batch until it reaches that block;
2. for each block: run the calibration batches through it with hooks on its target linears that accumulate
   input statistics (linears reading the same input tensor share one ``InputStats``; padding skipped via the
   attention mask, or for linears reading another sequence such as the encoder output in cross-attention, via
   that sequence's mask: ``StageSpec.context_masks``); prune every target linear; run the batches through the
   pruned block to get the next block's inputs. Only one block's activations and statistics are resident;
   with ``offload`` they live on the CPU between uses.

With ``device`` (an execution device, e.g. ``cuda``) the weights stay where they are (the CPU): each block is
moved to ``device`` for its statistics, pruning and outputs, then moved back (:class:`_Onload`; the way
SparseGPT's reference script and llm-compressor's sequential pipeline treat models larger than the GPU). During
a capture, the modules the forward reaches before the stage (embeddings, patch embeddings, the projector, the
vision blocks before a language stage) go to ``device`` when called: a block goes back when its call returns,
a module outside the blocks when the capture ends. Peak device memory: one block, its statistics and one
calibration batch's activations (plus, during a capture, the embeddings). Every move goes through
:func:`_place`, or, for a model built on the meta device, through a :class:`WeightSource` that reads each
module's weights when it arrives and writes a pruned block out when it leaves (:mod:`vlmsparse.pipeline.stream`).

Before any weight changes, the configuration, every target weight (NaN/inf, N:M divisibility) and every
calibration batch (image tokens) are checked. If anything fails during pruning (e.g. NaN activations), the
weights changed so far are restored and the error is raised.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from ..masks import MaskSet
from ..models import PARTS, ArchSpec, ResolvedStage, get_arch_spec
from ..pruning import (
    METHODS,
    InputStats,
    check_weight,
    outlier_ratio,
    owl_sparsities,
    prune_layer,
    sparsegpt_prune,
)
from ..sparsity import SparsityPattern, parse_pattern

__all__ = ["PruneConfig", "LayerReport", "WeightSource", "prune_model", "report_of", "format_report", "ALLOCATIONS"]

log = logging.getLogger(__name__)

ALLOCATIONS = ("equal", "language", "vision", "owl")
_CACHE_KEYS = ("past_key_value", "past_key_values", "layer_past")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    - ``method``: ``magnitude`` | ``wanda`` | ``sparsegpt``.
    - ``sparsity``: a pattern (``0.5``, ``"70%"``, ``"2:4"``) used by ``equal`` / ``language`` / ``vision`` / ``owl``.
    - ``allocation``: ``equal`` (vision and language blocks at ``sparsity``), ``language`` (language blocks only),
      ``vision`` (vision blocks only), ``owl`` (``equal`` with outlier-weighted layer-wise sparsity), or a
      mapping part -> pattern (``{"vision": 0.5, "language": 0.7}``; ``"connector"`` prunes the projector /
      Q-Former too; a part absent or at 0 is left dense).
    - ``scope``: unstructured comparison group for magnitude/Wanda: ``row``, ``matrix`` or ``auto`` (per
      matrix in the vision encoder, as the reference VLM code did, per row elsewhere). SparseGPT selects per
      column block and accepts only ``auto``.
    - ``owl``: OWL on top of the allocation (unstructured only); ``owl_lambda`` the sparsity spread around the
      target, ``owl_threshold`` the outlier factor M (score > M x mean).
    - ``blocksize``, ``dampening``: SparseGPT column block and Hessian dampening (fraction of mean diagonal).
    - ``report_error``: accumulate ``X^T X`` for every layer to report the reconstruction error (always on
      for SparseGPT; costs about one extra forward for Wanda).
    - ``offload``: keep calibration activations on the CPU between blocks (``None``: when the execution device
      is an accelerator).
    - ``device``: the execution device (``"cuda"``, ``"cuda:1"``, ``"cpu"``). ``None``: run where the model is.
      Given: the weights stay where they are (e.g. the CPU, for a model larger than the GPU's memory) and each
      block is moved to ``device`` in turn for calibration and pruning, then moved back.
    - ``stack_shared``: SparseGPT prunes linears that share an input (q/k/v, gate/up) as one stacked weight.
    - ``restore_on_error``: keep a CPU copy of each weight before it changes, to restore the model if pruning
      fails half-way (e.g. NaN activations); costs host memory of the pruned weights until the end.
    """

    method: str = "wanda"
    sparsity: Any = 0.5
    allocation: Any = "equal"
    scope: str = "auto"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    blocksize: int = 128
    dampening: float = 0.01
    report_error: bool = True
    offload: bool | None = None
    device: str | torch.device | None = None
    stack_shared: bool = True
    progress: bool = True
    restore_on_error: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method: unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if isinstance(self.allocation, str):
            if self.allocation not in ALLOCATIONS:
                raise ValueError(
                    f"PruneConfig.allocation: unknown allocation {self.allocation!r}; allowed: "
                    f"{', '.join(ALLOCATIONS)} or a mapping like {{'vision': 0.5, 'language': 0.7}}"
                )
            parse_pattern(self.sparsity)
        elif isinstance(self.allocation, Mapping):
            if not self.allocation:
                raise ValueError("PruneConfig.allocation: the per-part mapping is empty")
            for part, value in self.allocation.items():
                if part not in PARTS:
                    raise ValueError(f"PruneConfig.allocation: unknown part {part!r}; allowed: {', '.join(PARTS)}")
                parse_pattern(value)
        else:
            raise ValueError(
                f"PruneConfig.allocation must be one of {ALLOCATIONS} or a mapping part -> sparsity, got "
                f"{type(self.allocation).__name__}"
            )
        if self.scope not in ("auto", "row", "matrix"):
            raise ValueError(f"PruneConfig.scope: got {self.scope!r}; allowed: auto, row, matrix")
        if self.method == "sparsegpt" and self.scope != "auto":
            raise ValueError(
                f"PruneConfig.scope: got {self.scope!r} with method 'sparsegpt', which chooses its mask per column "
                "block as the reference does (no row / matrix comparison group); allowed: auto"
            )
        if not 0.0 <= self.owl_lambda < 0.5:
            raise ValueError(f"PruneConfig.owl_lambda: got {self.owl_lambda}; allowed: [0, 0.5)")
        if self.owl_threshold <= 0:
            raise ValueError(f"PruneConfig.owl_threshold: got {self.owl_threshold}; allowed: > 0")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"PruneConfig.blocksize: got {self.blocksize!r}; allowed: a positive int")
        if not 0.0 < self.dampening < 1.0:
            raise ValueError(f"PruneConfig.dampening: got {self.dampening}; allowed: (0, 1)")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"PruneConfig.device: got {self.device!r}; allowed: None or a device name such as "
                                 "cpu, cuda, cuda:1") from None
        if self.use_owl and any(p.is_nm for p in self.part_patterns_unchecked().values()):
            raise ValueError("PruneConfig: OWL assigns layer-wise unstructured sparsity; it does not apply to N:M")

    @property
    def use_owl(self) -> bool:
        return self.owl or self.allocation == "owl"

    def part_patterns_unchecked(self) -> dict[str, SparsityPattern]:
        if isinstance(self.allocation, Mapping):
            return {part: parse_pattern(v) for part, v in self.allocation.items()}
        pattern = parse_pattern(self.sparsity)
        parts = {"equal": ("vision", "language"), "owl": ("vision", "language"),
                 "language": ("language",), "vision": ("vision",)}[self.allocation]
        return {part: pattern for part in parts}


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


@dataclass
class _Target:
    name: str
    module: nn.Linear
    part: str
    pattern: SparsityPattern
    scope: str
    reads_tail: bool = False  # reads only the masked tail of the stage's sequence (StageSpec.masked_tail)
    checked: bool = False  # check_weight passed (weights on the meta device are checked when their block arrives)


@dataclass
class _Batch:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool
    token_mask: torch.Tensor | None
    per_block: list | None = None  # (args, kwargs) per block when kwargs cannot be reused
    tail_mask: torch.Tensor | None = None  # the mask of the stage sequence's tail (StageSpec.masked_tail)
    contexts: dict = field(default_factory=dict)  # block argument name -> token mask of that sequence (or None)
    hidden_key: str = "hidden_states"  # the keyword of the hidden states when hidden_in_kwargs


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


# ----------------------------------------------------------------------------------------------- helpers
def _move(obj: Any, device: torch.device | None, memo: dict | None = None) -> Any:
    """``obj`` with every tensor (in nested tuples / lists / dicts) moved to ``device``; shared tensors stay shared."""
    if device is None:
        return obj
    if memo is None:
        memo = {}
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


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


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run_model(model: nn.Module, batch: Mapping, device: torch.device) -> None:
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    inputs.setdefault("use_cache", False)
    model(**inputs)


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


# ------------------------------------------------------------------------------------- weight placement
def _own_tensors(module: nn.Module, recurse: bool) -> Iterator[torch.Tensor]:
    for m in module.modules() if recurse else (module,):
        yield from (t for t in m._parameters.values() if t is not None)
        yield from (t for t in m._buffers.values() if t is not None)


def _place(module: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """Move ``module``'s parameters and buffers (only its own with ``recurse=False``) to ``device`` in place.
    Parameters stay the same objects (``.data`` is replaced), so tied weights stay tied. Every move of weights
    by the pipeline goes through this function."""
    for m in module.modules() if recurse else (module,):
        for name, p in m._parameters.items():
            if p is None or p.device == device:
                continue
            if p.is_meta:
                raise ValueError(f"{type(m).__name__}.{name} is on the meta device (not loaded): load the model's "
                                 "weights (e.g. on the CPU) before pruning with a device")
            p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)


def _home_of(module: nn.Module, recurse: bool) -> torch.device | None:
    """Where ``module``'s tensors are (the first one's device); None when it holds none."""
    for t in _own_tensors(module, recurse):
        return t.device
    return None


class WeightSource(Protocol):
    """Where the weights of a model built on the meta device live (e.g. :class:`~vlmsparse.pipeline.stream.
    StreamedWeights`): ``load`` materialises a module's tensors (its own only without ``recurse``) on ``device``,
    ``unload`` keeps what changed and returns them to the meta device."""

    def load(self, module: nn.Module, device: torch.device, recurse: bool) -> None: ...

    def unload(self, module: nn.Module, recurse: bool) -> None: ...


class _Onload:
    """Weights at home (where :func:`prune_model` found them, or a :class:`WeightSource`), visiting the execution
    device one block at a time.

    Units: every block of every stage (moved whole); outside the blocks, every module that holds no block
    (embeddings, norms, rotary tables, a vision pooling head; moved whole, so a parent using a child's weight
    without calling it, as ``nn.MultiheadAttention`` does with ``out_proj``, finds it there) and the own tensors
    of every module that holds blocks (BLIP-2's query tokens on the root; moved without their children).
    """

    def __init__(self, model: nn.Module, stages: list[ResolvedStage], device: torch.device,
                 source: WeightSource | None = None) -> None:
        self.device = device
        self.source = source
        self.blocks = [block for stage in stages for block in stage.blocks]
        block_names = [name for stage in stages for name in stage.block_names]
        holders = {""} | {name.rsplit(".", i)[0] for name in block_names for i in range(1, name.count(".") + 1)}
        holders -= set(block_names)
        self.others: list[tuple[nn.Module, bool]] = []  # (module, recurse)
        for name, module in model.named_modules():
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if name in holders:
                unit = (module, False)
            elif name and parent in holders and name not in block_names:
                unit = (module, True)
            else:
                continue
            if next(_own_tensors(*unit), None) is not None:
                self.others.append(unit)
        self.home: dict[int, torch.device] = {}
        for module, recurse in [(b, True) for b in self.blocks] + self.others:
            home = _home_of(module, recurse)
            if home is not None:
                self.home[id(module)] = home

    def load(self, module: nn.Module, recurse: bool = True) -> None:
        if self.source is not None:
            self.source.load(module, self.device, recurse)
        else:
            _place(module, self.device, recurse)

    def unload(self, module: nn.Module, recurse: bool = True) -> None:
        home = self.home.get(id(module))
        if self.source is not None:
            self.source.unload(module, recurse)
        elif home is not None:
            _place(module, home, recurse)

    @contextmanager
    def visit(self, block: nn.Module) -> Iterator[None]:
        """``block`` on the execution device inside the ``with``; back home after it (also on errors)."""
        self.load(block)
        try:
            yield
        finally:
            self.unload(block)

    @contextmanager
    def on_call(self) -> Iterator[None]:
        """Inside the ``with``, a unit goes to the execution device when the forward calls it, with its tensor
        arguments: a block goes home when its call returns, the others when the ``with`` ends. Hooks that must
        act before a block moves (a capture's stop) are registered with ``prepend=True``."""
        loaded: dict[int, nn.Module] = {}

        def pre(module, args, kwargs, recurse):
            if id(module) not in loaded:
                self.load(module, recurse)
                loaded[id(module)] = module
            memo: dict = {}
            return _move(args, self.device, memo), _move(kwargs, self.device, memo)

        def post(module, args, output):
            self.unload(module)
            loaded.pop(id(module), None)

        handles = []
        for block in self.blocks:
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k: pre(m, a, k, True), with_kwargs=True))
            handles.append(block.register_forward_hook(post))
        recurses = {id(b): True for b in self.blocks}
        for module, recurse in self.others:
            recurses[id(module)] = recurse
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, r=recurse: pre(m, a, k, r), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for key, module in loaded.items():
                self.unload(module, recurse=recurses[key])


def _visit(onload: _Onload | None, block: nn.Module):
    return onload.visit(block) if onload is not None else nullcontext()


# ---------------------------------------------------------------------------------------------- planning
def _plan(
    spec: ArchSpec, stages: list[ResolvedStage], cfg: PruneConfig
) -> list[tuple[ResolvedStage, list[list[_Target]]]]:
    """Per stage to visit: the target linears of each block."""
    patterns = cfg.part_patterns_unchecked()
    present = {s.part for s in stages}
    if cfg.allocation in ("equal", "owl"):  # both parts where the model has them (language-only LMs too)
        patterns = {part: p for part, p in patterns.items() if part in present}
    for part in patterns:
        if part not in present:
            raise ValueError(f"{spec.name} has no {part} part to prune; its parts: {', '.join(sorted(present))}")
    explicit_connector = isinstance(cfg.allocation, Mapping) and "connector" in cfg.allocation
    plan = []
    for stage in stages:
        pattern = patterns.get(stage.part)
        if pattern is None or (not pattern.is_nm and pattern.sparsity == 0):
            continue
        if not stage.spec.default and not (stage.part == "connector" and explicit_connector):
            continue
        scope = cfg.scope
        if scope == "auto":
            scope = "matrix" if stage.part == "vision" else "row"
        per_block = []
        for block_name, block in zip(stage.block_names, stage.blocks):
            targets = []
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    name = f"{block_name}.{sub}" if sub else block_name
                    reads_tail = sub in (stage.spec.masked_tail or ())
                    targets.append(_Target(name, module, stage.part, pattern, scope, reads_tail))
            per_block.append(targets)
        if any(per_block):
            plan.append((stage, per_block))
    if not plan:
        raise ValueError("nothing to prune: every part's sparsity is 0 or absent")
    return plan


# ------------------------------------------------------------------------------------------ calibration
def _capture(
    model: nn.Module, stage: ResolvedStage, batches: list, device: torch.device, store: torch.device | None,
    onload: _Onload | None = None,
) -> list[_Batch]:
    """Inputs of the stage's first block (and of every block when kwargs cannot be reused), per batch. With
    ``onload``, the modules the forward calls visit ``device`` while needed (:meth:`_Onload.on_call`)."""
    with onload.on_call() if onload is not None else nullcontext():
        return _capture_batches(model, stage, batches, device, store)


def _capture_batches(
    model: nn.Module, stage: ResolvedStage, batches: list, device: torch.device, store: torch.device | None
) -> list[_Batch]:
    blocks = stage.blocks
    all_blocks = not stage.spec.reuse_kwargs and len(blocks) > 1
    captured: list[_Batch] = []
    for batch in batches:
        calls: list[tuple[tuple, dict]] = []

        def pre_hook(module, args, kwargs, _calls=calls):
            _calls.append((args, kwargs))
            if not all_blocks:
                raise _Stop

        def last_hook(module, args, output):
            raise _Stop

        handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)  # before an onload
                   for b in (blocks if all_blocks else blocks[:1])]
        if all_blocks:
            handles.append(blocks[-1].register_forward_hook(last_hook))
        try:
            with torch.no_grad():
                _run_model(model, batch, device)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if not calls:
            raise RuntimeError(f"calibration forward never reached {stage.block_names[0]}")
        memo: dict = {}
        entries = []
        # the hidden states' keyword when given by keyword: hidden_states, or e.g. hidden_state (Mllama's vision
        # encoder in transformers 5.17), else the first forward parameter the call names
        given = calls[0][1]
        params = [p for p in inspect.signature(blocks[0].forward).parameters if p in given]
        hidden_key = next((k for k in given if k.startswith("hidden_state")), params[0] if params else "hidden_states")
        for args, kwargs in calls:
            kwargs, args = _clean_kwargs(kwargs), _clean_args(args)
            if args:
                hidden, rest, in_kwargs = args[0], tuple(args[1:]), False
            else:
                hidden, rest, in_kwargs = kwargs.pop(hidden_key), (), True
            entries.append((hidden, _move(rest, store, memo), _move(kwargs, store, memo), in_kwargs))
        hidden, rest, kwargs, in_kwargs = entries[0]
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
            bound = _arguments(blocks[0], *calls[0])
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
                per_block=[(e[1], e[2]) for e in entries] if all_blocks else None,
                contexts=contexts,
            )
        )
    return captured


def _run_block(block: nn.Module, index: int, b: _Batch, device: torch.device) -> torch.Tensor:
    args, kwargs = (b.per_block[index] if b.per_block is not None else (b.args, b.kwargs))
    memo: dict = {}
    hidden = b.hidden.to(device)
    args, kwargs = _move(args, device, memo), _move(kwargs, device, memo)
    if b.hidden_in_kwargs:
        out = block(*args, **{b.hidden_key: hidden}, **kwargs)
    else:
        out = block(hidden, *args, **kwargs)
    return _first(out)


def _collect_stats(
    block: nn.Module, index: int, targets: list[_Target], batches: list[_Batch], device: torch.device,
    hessian: bool, keep_outputs: bool, store: torch.device | None,
) -> tuple[dict[str, InputStats], dict[str, int], list[torch.Tensor] | None]:
    """Run every batch through ``block``; return stats per group, group index per target, and the outputs
    (when ``keep_outputs``, used when the block is not pruned afterwards)."""
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
                    stats[gid] = InputStats(x.shape[-1], hessian=hessian)
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


# ------------------------------------------------------------------------------------------------- OWL
def _outlier_ratio(targets: list[_Target], stats: dict[str, InputStats], threshold: float) -> float:
    """OWL's outlier ratio of one block: the Wanda scores of all its linears together, one mean (as the reference)."""
    scores = [t.module.weight.detach().abs().float() * stats[t.name].norm.to(t.module.weight.device).unsqueeze(0)
              for t in targets]
    return outlier_ratio(scores, threshold)


# ------------------------------------------------------------------------------------------------ pruning
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
    with torch.no_grad():
        t.module.weight.copy_(new)
    masks.masks[t.name] = keep.detach().to("cpu")
    masks.patterns[t.name] = str(t.pattern)
    sparsity = 1.0 - float(keep.sum()) / keep.numel()
    report.append(LayerReport(t.name, t.part, tuple(keep.shape), str(t.pattern), sparsity, error, seconds))
    log.debug("pruned %s to %s (sparsity %.4f, error %s)", t.name, t.pattern, sparsity, error)


def _progress(iterable, desc: str, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


# ------------------------------------------------------------------------------------------------ entry
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
    The per-layer report is in ``masks.info["report"]`` (JSON; see :func:`report_of`).
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
    needs_data = cfg.method != "magnitude" or cfg.use_owl
    batches = list(calibration) if calibration is not None else []
    if needs_data or batches:
        _check_batches(spec, model, batches)
    device = torch.device(cfg.device) if cfg.device is not None else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"PruneConfig.device: got {cfg.device!r}, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    onload = _Onload(model, stages, device, weights) if cfg.device is not None else None
    offload = cfg.offload if cfg.offload is not None else device.type != "cpu"
    store = torch.device("cpu") if offload else None
    hessian = cfg.method == "sparsegpt" or (cfg.report_error and bool(batches))

    masks = MaskSet(method=cfg.method)
    report: list[LayerReport] = []
    backups: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if cfg.use_owl:
                _apply_owl(model, plan, batches, device, store, cfg, onload)
            for stage, per_block in plan:
                _prune_stage(model, stage, per_block, batches, device, store, cfg, hessian, masks, report, backups,
                             onload)
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
        report=json.dumps([asdict(r) for r in report]),
    )
    log.info("pruned %d linears of %s with %s in %.1f s (overall sparsity %.4f)", len(masks), spec.name,
             cfg.method, total, masks.sparsity())
    return masks


def _backup(targets: list[_Target], backups: dict[str, torch.Tensor], cfg: PruneConfig) -> None:
    if not cfg.restore_on_error:
        return
    for t in targets:
        backups[t.name] = t.module.weight.detach().to("cpu", copy=True)


def _check_arrived(targets: list[_Target]) -> None:
    """``check_weight`` for the targets not checked up front (their weights were on the meta device)."""
    for t in targets:
        if not t.checked:
            check_weight(t.module.weight.detach(), t.pattern, t.name)
            t.checked = True


def _prune_stage(model, stage, per_block, batches, device, store, cfg, hessian, masks, report, backups,
                 onload: _Onload | None = None) -> None:
    needs_data = cfg.method != "magnitude" or (cfg.report_error and bool(batches))
    blocks = _progress(list(zip(stage.blocks, per_block)), f"prune {stage.part}", cfg.progress, len(per_block))
    if not needs_data:
        for block, targets in blocks:
            if targets:
                with _visit(onload, block):
                    _check_arrived(targets)
                    _backup(targets, backups, cfg)
                    _prune_block(targets, {}, {}, cfg, masks, report)
        return
    captured = _capture(model, stage, batches, device, store, onload)
    last = len(stage.blocks) - 1
    for index, (block, targets) in enumerate(blocks):
        if not targets and index == last:
            continue
        with _visit(onload, block):
            if targets:
                _check_arrived(targets)
                stats, group_of, _ = _collect_stats(block, index, targets, captured, device, hessian, False, store)
                _backup(targets, backups, cfg)
                _prune_block(targets, stats, group_of, cfg, masks, report)
                del stats
            if index < last:
                _advance(block, index, captured, device, store)


def _advance(block: nn.Module, index: int, captured: list[_Batch], device: torch.device,
             store: torch.device | None) -> None:
    """Replace each batch's hidden states by ``block``'s outputs: the inputs of the next block."""
    for b in captured:
        out = _run_block(block, index, b, device).detach()
        b.hidden = out.to(store) if store is not None else out


def _apply_owl(model, plan, batches, device, store, cfg: PruneConfig, onload: _Onload | None = None) -> None:
    """Dense pre-pass: outlier ratio per block, then the block's targets get OWL sparsities (per part).

    A block without targets is run (the next block's inputs are its outputs, as in :func:`_prune_stage`) but gets
    no ratio: the sparsities spread around the target over the blocks that are pruned."""
    for stage, per_block in plan:
        captured = _capture(model, stage, batches, device, store, onload)
        last = len(stage.blocks) - 1
        ratios = []
        for index, (block, targets) in enumerate(zip(stage.blocks, per_block)):
            if not targets:
                if index < last:
                    with _visit(onload, block):
                        _advance(block, index, captured, device, store)
                continue
            with _visit(onload, block):
                _check_arrived(targets)
                stats, _, outputs = _collect_stats(block, index, targets, captured, device, False, True, store)
                ratios.append(_outlier_ratio(targets, stats, cfg.owl_threshold))
            for b, out in zip(captured, outputs):
                b.hidden = out
        pruned = [targets for targets in per_block if targets]
        sparsities = owl_sparsities(ratios, pruned[0][0].pattern.sparsity, cfg.owl_lambda)
        for targets, s in zip(pruned, sparsities):
            for t in targets:
                t.pattern = SparsityPattern(round(s, 6))
        log.info("OWL %s sparsities: %s", stage.part, [round(s, 4) for s in sparsities])


def report_of(masks: MaskSet) -> list[LayerReport]:
    """The per-layer report recorded by :func:`prune_model`."""
    rows = json.loads(masks.info.get("report", "[]"))
    return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in rows]


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
    if "stages" in masks.info:
        lines.append(f"architecture {masks.info.get('architecture', '?')}: {masks.info['stages']}")
    return "\n".join(lines)
