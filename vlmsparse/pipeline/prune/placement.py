"""Where weights and activations are (layer 5, part of :mod:`vlmsparse.pipeline.prune`): moving nested
tensors (:func:`_move`), weights in place (:func:`_place`, every move of weights by the pipeline), and
:class:`_Onload`, the weights at home visiting the execution device one block at a time (from where
:func:`~vlmsparse.pipeline.prune.prune_model` found them, or from a :class:`WeightSource` such as
:class:`~vlmsparse.pipeline.stream.StreamedWeights` for a model built on the meta device).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from ...models import ResolvedStage


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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
