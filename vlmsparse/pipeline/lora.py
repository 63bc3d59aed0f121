"""Whole-model SparseLoRA verbs (layer 5 of docs/ARCHITECTURE.md): add adapters, merge them, undo them, mask gradients.

Methods the research compares, selectable by name (``METHODS``):

- ``"sparselora"``: adapters whose update is multiplied by the mask; merge keeps the sparsity bit for bit;
- ``"lora"``: plain LoRA, merged densely (the sparsity is lost);
- ``"lora-remask"``: plain LoRA, re-masked after merging;
- ``"full"``: full finetuning of the masked weights with gradients masked (:func:`mask_gradients`), so
  pruned entries stay exactly zero under SGD / Adam / AdamW (with weight decay).

Swaps are instance swaps with an inverse (:func:`remove_sparse_lora`); nothing patches classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from torch import nn

from ..masks import MaskSet
from ..modules.sparse_linear import SparseLinear
from ..modules.sparse_lora import METHODS as ADAPTER_METHODS
from ..modules.sparse_lora import SparseLoRALinear, sparse_lora_modules, teacher_mode

__all__ = [
    "METHODS",
    "add_sparse_lora",
    "merge_sparse_lora",
    "remove_sparse_lora",
    "mask_gradients",
    "MaskedGradients",
    "lora_parameters",
    "teacher_mode",
    "sparse_lora_modules",
]

logger = logging.getLogger(__name__)

# the adapter methods of SparseLoRALinear, plus masked full finetuning (no adapter)
METHODS = (*ADAPTER_METHODS, "full")

Target = Callable[[nn.Module, str], bool] | Iterable[str] | None
PerModule = int | float | Mapping[str, int | float] | Callable[[str, nn.Module], int | float]


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"the model has no module {name!r} (a name in the mask set)") from error


def _part_fn(model: nn.Module) -> Callable[[str], str | None]:
    try:
        from ..models import get_arch_spec

        spec = get_arch_spec(model)
        return spec.part_of
    except (ImportError, ValueError, AttributeError):
        return lambda name: None


def _value_for(value: PerModule, name: str, module: nn.Module, part: str | None, what: str) -> int | float:
    """An int/float, a dict keyed by module name or part (``vision``/``connector``/``language``, with an optional
    ``default``), or a callable ``(name, module) -> value``."""
    if callable(value):
        return value(name, module)
    if isinstance(value, Mapping):
        for key in (name, part, "default"):
            if key is not None and key in value:
                return value[key]
        raise ValueError(
            f"{what}: no entry for module {name!r} (part {part!r}); keys may be module names, parts "
            f"(vision/connector/language) or 'default', got {sorted(value)[:6]}"
        )
    return value


def _packed_modules(model: nn.Module) -> list[str]:
    """Names of the packed 2:4 :class:`SparseLinear` modules of ``model`` (their pattern is their mask), those
    wrapped already by their wrapper's name."""
    names, wrapped = [], set()
    for name, module in model.named_modules():
        if isinstance(module, SparseLoRALinear) and module.packed_base:
            names.append(name)
            wrapped.add(f"{name}.base_layer")
        elif isinstance(module, SparseLinear) and module.backend == "packed24" and name not in wrapped:
            names.append(name)
    return names


def _targets(model: nn.Module, masks: Mapping[str, torch.Tensor], target: Target) -> list[str]:
    """Names of the modules to wrap: those with a mask (and, with no mask set, the packed 2:4 SparseLinear
    modules; see :func:`add_sparse_lora`), narrowed by ``target``. Already wrapped modules are included."""
    if target is not None and not callable(target):
        names = [target] if isinstance(target, str) else list(target)
        missing = [n for n in names if n not in masks]
        if missing:
            raise ValueError(f"target names without a mask: {missing[:5]} (the mask set has {len(masks)} modules)")
        chosen = names
    else:
        chosen = []
        for name, module in model.named_modules():
            if name in masks and (target is None or target(module, name)):
                chosen.append(name)
    for name in chosen:
        module = _get_module(model, name)
        if not isinstance(module, (SparseLoRALinear, SparseLinear)) and type(module) is not nn.Linear:
            raise ValueError(f"{name!r} is a {type(module).__name__}; SparseLoRA wraps nn.Linear modules and packed "
                             "2:4 SparseLinear modules")
    return chosen


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` weights of every adapter of every :class:`SparseLoRALinear` in ``model``."""
    return [layers[a].weight for _, m in sparse_lora_modules(model) for a in m.lora_A
            for layers in (m.lora_A, m.lora_B)]


def add_sparse_lora(
    model: nn.Module,
    masks: MaskSet | Mapping[str, torch.Tensor] | None,
    r: PerModule = 8,
    lora_alpha: PerModule = 16,
    lora_dropout: float = 0.0,
    target: Target = None,
    method: str = "sparselora",
    keep_dense: bool = False,
    init_lora_weights: bool = True,
    backend: str | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap the masked ``nn.Linear`` modules of ``model`` in :class:`SparseLoRALinear`, in place.

    ``masks``: module name -> bool keep-mask ``[out, in]``; ``None`` for a compressed model
    (``load_compressed(..., as_sparse=True)``): its packed 2:4 ``SparseLinear`` modules are wrapped, each masked by
    its own pattern, with the frozen weight kept packed (see :mod:`vlmsparse.modules.sparse_lora`); a module of the
    mask set that is such a ``SparseLinear`` is wrapped the same way (its mask must equal its pattern).
    ``target``: ``None`` (every masked linear), a filter ``fn(module, name) -> bool`` or module names. ``r`` /
    ``lora_alpha``: a number, a dict keyed by module name or by part (``{"language": 8, "vision": 4}``, parts
    from :mod:`vlmsparse.models` when the architecture is known), or ``fn(name, module)``. Afterwards only
    ``lora_A`` / ``lora_B`` are trainable (calling it again on other modules keeps earlier adapters trainable).
    ``method="full"`` calls :func:`mask_gradients` instead. Masks are moved to each weight's device. Returns
    ``model``. The layers are peft LoRA layers in place, without a ``PeftModel``; the adapter is named
    ``adapter_name``. A module already wrapped gets ``adapter_name`` added when it lacks it (as peft's
    ``add_adapter``: the active adapters stay as they were; ``module.set_adapter(...)`` switches) and is left as it
    is when it has it. ``integrations.peft.save_sparse_lora`` saves an adapter as a peft adapter folder.
    """
    if method not in METHODS:
        raise ValueError(f"add_sparse_lora: method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"add_sparse_lora: adapter_name must be a non-empty string, got {adapter_name!r}")
    if masks is None:
        if method == "full":
            raise ValueError("add_sparse_lora: method='full' trains the weights themselves and needs masks (a packed "
                             "SparseLinear has no trainable weight)")
        mask_map = dict.fromkeys(_packed_modules(model))
        if not mask_map:
            raise ValueError("add_sparse_lora: masks=None wraps the packed 2:4 SparseLinear modules of a compressed "
                             "model, and this model has none; pass the masks of the pruned model")
    else:
        mask_map = masks.masks if isinstance(masks, MaskSet) else dict(masks)
    names = _targets(model, mask_map, target)
    if method == "full":
        packed = [n for n in names if isinstance(_get_module(model, n), SparseLinear)]
        if packed:
            raise ValueError(f"add_sparse_lora: method='full' trains the weights, and {packed[0]!r} is a packed "
                             "SparseLinear without a trainable weight; use method='sparselora' or the nn.Linear model")
        names = [n for n in names if not isinstance(_get_module(model, n), SparseLoRALinear)]
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            for p in _get_module(model, name).parameters():
                p.requires_grad_(True)
        mask_gradients(model, {n: mask_map[n] for n in names})
        return model
    if not names:
        logger.warning("add_sparse_lora: no module matched (mask set of %d modules)", len(mask_map))
    part_of = _part_fn(model)
    for name in names:
        module = _get_module(model, name)
        part = part_of(name)
        rank = _value_for(r, name, module, part, "r")
        alpha = _value_for(lora_alpha, name, module, part, "lora_alpha")
        try:
            if isinstance(module, SparseLoRALinear):  # wrapped before: one more adapter, or nothing
                if adapter_name not in module.lora_A:
                    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(lora_dropout),
                                        init_lora_weights=init_lora_weights)
                    module.update_layer(adapter_name, rank, lora_alpha=alpha, config=config)
                continue
            mask = mask_map[name]
            device = module.values.device if isinstance(module, SparseLinear) else module.weight.device
            wrapped = SparseLoRALinear(
                module, None if mask is None else mask.to(device), r=rank, lora_alpha=alpha,
                lora_dropout=lora_dropout, method=method, keep_dense=keep_dense,
                init_lora_weights=init_lora_weights, backend=backend, adapter_name=adapter_name,
            )
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        model.set_submodule(name, wrapped)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    logger.info("add_sparse_lora: wrapped %d linears (%s)", len(names), method)
    return model


def merge_sparse_lora(model: nn.Module, safe_merge: bool = False, check: bool = True) -> nn.Module:
    """Replace every :class:`SparseLoRALinear` by its base layer's kind holding the merged weight, in place (a plain
    ``nn.Linear``; a packed 2:4 ``SparseLinear`` over a packed base); returns ``model``. For ``sparselora`` /
    ``lora-remask`` the merged weight is zero exactly outside the mask (checked when ``check``); ``lora`` merges
    densely. ``safe_merge`` refuses NaN / inf."""
    count = 0
    for name, module in list(sparse_lora_modules(model)):
        linear = module.merged_base()
        weight = linear.dense_weight() if isinstance(linear, SparseLinear) else linear.weight
        if safe_merge and not bool(torch.isfinite(weight).all()):
            raise ValueError(f"merge_sparse_lora: {name}: the merged weight has NaN/inf entries")
        if check and module.method != "lora":
            outside = int(((weight != 0) & ~module.keep_mask()).sum())
            if outside:
                raise RuntimeError(f"merge_sparse_lora: {name}: {outside} non-zeros outside the mask after merging")
        model.set_submodule(name, linear)
        count += 1
    logger.info("merge_sparse_lora: merged %d modules", count)
    return model


def remove_sparse_lora(model: nn.Module) -> nn.Module:
    """The inverse of :func:`add_sparse_lora`: put the original ``nn.Linear`` modules back (adapters dropped,
    merged modules unmerged first), in place; returns ``model``."""
    for name, module in list(sparse_lora_modules(model)):
        model.set_submodule(name, module.to_base_linear())
    return model


# ---------------------------------------------------------------------------------------------- full
@dataclass
class MaskedGradients:
    """Handles of the gradient hooks :func:`mask_gradients` registered; :meth:`remove` undoes them."""

    handles: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def mask_gradients(
    model: nn.Module, masks: MaskSet | Mapping[str, torch.Tensor], apply: bool = True
) -> MaskedGradients:
    """For full finetuning: hook every masked module's ``weight`` so its gradient is multiplied by the mask.

    With ``apply`` the weights are first zeroed outside their masks. With zero gradients at pruned positions,
    SGD (momentum), Adam and AdamW (decoupled weight decay multiplies the weight, which is 0) keep those
    entries exactly zero. Does not change ``requires_grad``. Returns the hook handles.
    """
    mask_map = masks.masks if isinstance(masks, MaskSet) else dict(masks)
    result = MaskedGradients()
    for name, mask in mask_map.items():
        module = _get_module(model, name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != mask.shape:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise ValueError(f"mask_gradients: {name}: mask {tuple(mask.shape)} does not match weight {got}")
        if not weight.requires_grad:
            raise ValueError(f"mask_gradients: {name}.weight does not require grad; unfreeze it first")
        keep = mask.to(weight.device)
        if apply:
            with torch.no_grad():
                weight.masked_fill_(~keep, 0)

        def hook(grad: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
            return grad.masked_fill(~keep, 0)

        result.handles.append(weight.register_hook(hook))
        result.names.append(name)
    return result
