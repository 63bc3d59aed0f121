"""SparseLoRA through peft: ``get_peft_model`` with a ``LoraConfig`` builds masked LoRA layers.

peft's experimental custom-module mapping (``LoraConfig._register_custom_module``) maps ``nn.Linear`` to a
factory that, for a module named in the mask set, builds :class:`PeftSparseLoRALinear` (a subclass of peft's
``lora.Linear``: same ``lora_A`` / ``lora_B`` ModuleDicts, so adapters save and load with peft's keys), and
plain peft LoRA for targeted modules without a mask.

Math (``s = lora_alpha / r``): ``y = x @ (W*M + s*(B@A)*M).T + b`` through
:func:`vlmsparse.ops.sparse_lora_linear`; ``get_delta_weight = s*(B@A)*M``, so peft's ``merge`` and
``merge_and_unload`` add zero outside the mask and the pruned entries stay exactly zero.

Saving: :func:`save_sparse_lora` writes the peft adapter plus ``sparsity_masks.safetensors`` beside it;
:func:`load_sparse_lora` reads both, checks the masks against the base model (and against the caller's
masks, when given) and returns a ``PeftModel`` whose layers are SparseLoRA again.

    config = sparse_lora_config(masks, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(model, config)
    ...train...
    save_sparse_lora(model, "adapter/")
    model = load_sparse_lora(base_model, "adapter/")
    merged = model.merge_and_unload()            # zeros of each weight == zeros of its mask
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import file_identities, follow_umask
from ..masks import MaskSet
from ..modules.sparse_lora import _check_mask
from ..ops import sparse_lora_linear, zero_weight

__all__ = [
    "PeftSparseLoRALinear",
    "SparseLoRAFactory",
    "register_sparse_lora",
    "sparse_lora_config",
    "peft_sparse_masks",
    "save_sparse_lora",
    "load_sparse_lora",
]

logger = logging.getLogger(__name__)

try:  # peft is an optional dependency of the package; this module needs it.
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.lora.layer import dispatch_default as _peft_dispatch_default
except ImportError as _error:  # pragma: no cover - exercised only without peft
    raise ImportError("vlmsparse.integrations.peft needs the 'peft' package: pip install peft") from _error


class PeftSparseLoRALinear(_PeftLoraLinear):
    """peft's LoRA ``Linear`` with the update masked by ``sparsity_mask`` (bool ``[out, in]``, a buffer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, mask: torch.Tensor,
                 **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if kwargs.get("r", 0) <= 0:
            raise ValueError(f"SparseLoRA (peft): r must be a positive int, got {kwargs.get('r')!r}")
        mask = mask.to(base.weight.device)
        _check_mask(mask, base.weight, keep_dense=False, name=kwargs.get("target_name") or "")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        if config.fan_in_fan_out:
            raise ValueError("SparseLoRA (peft) wraps nn.Linear weights [out, in]; fan_in_fan_out must be False")
        self.register_buffer("sparsity_mask", mask.detach().clone(), persistent=False)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * (B@A) * M`` (``[out, in]``)."""
        return super().get_delta_weight(adapter).masked_fill(~self.sparsity_mask, 0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)
        if args or kwargs.get("adapter_names") is not None or any(
                a in self.lora_variant or self.lora_bias[a] for a in active):
            raise NotImplementedError(
                "SparseLoRA (peft) supports plain LoRA adapters only (no DoRA / variants / lora_bias / "
                "mixed-batch adapter_names)"
            )
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        if len(active) == 1 and (not self.training or isinstance(self.lora_dropout[active[0]], nn.Identity)):
            a = active[0]
            return sparse_lora_linear(x, weight, self.sparsity_mask, self.lora_A[a].weight, self.lora_B[a].weight,
                                      self.scaling[a], bias)
        # Several adapters, or dropout on the adapter input: base + sum of masked updates.
        result = base(x)
        zero = zero_weight(self.out_features, self.in_features, weight)
        for a in active:
            xd = self.lora_dropout[a](x)
            result = result + sparse_lora_linear(xd, zero, self.sparsity_mask, self.lora_A[a].weight,
                                                 self.lora_B[a].weight, self.scaling[a])
        return result


class SparseLoRAFactory:
    """The value registered in ``LoraConfig._register_custom_module({nn.Linear: factory})``: builds
    :class:`PeftSparseLoRALinear` for masked modules, plain peft LoRA for the others (logged)."""

    def __init__(self, masks: MaskSet | Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks.masks if isinstance(masks, MaskSet) else masks)

    def __call__(self, target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
        name = kwargs.get("target_name")
        if name in self.masks:
            return PeftSparseLoRALinear(target, adapter_name, config, self.masks[name], **kwargs)
        logger.info("SparseLoRA (peft): %s has no mask; plain LoRA", name)
        return _peft_dispatch_default(target, adapter_name, config=config, **kwargs)


def register_sparse_lora(config: LoraConfig, masks: MaskSet | Mapping[str, torch.Tensor]) -> LoraConfig:
    """Register the SparseLoRA mapping for ``nn.Linear`` on ``config`` (in place; returned). The mapping is not
    saved with the config: after loading, register again (:func:`load_sparse_lora` does)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"register_sparse_lora needs a peft LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("SparseLoRA (peft): use_dora=True is not supported")
    config._register_custom_module({nn.Linear: SparseLoRAFactory(masks)})
    return config


def sparse_lora_config(masks: MaskSet | Mapping[str, torch.Tensor], **lora_config_kwargs: Any) -> LoraConfig:
    """``LoraConfig(**lora_config_kwargs)`` with the SparseLoRA mapping registered. Without ``target_modules``
    the masked modules are targeted (by their full names)."""
    mask_map = masks.masks if isinstance(masks, MaskSet) else masks
    lora_config_kwargs.setdefault("target_modules", sorted(mask_map))
    return register_sparse_lora(LoraConfig(**lora_config_kwargs), masks)


def _base_names(peft_model: nn.Module) -> dict[str, PeftSparseLoRALinear]:
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return {n: m for n, m in base.named_modules() if isinstance(m, PeftSparseLoRALinear)}


def peft_sparse_masks(peft_model: nn.Module) -> MaskSet:
    """The masks of the SparseLoRA layers, keyed by module names of the base model."""
    return MaskSet(masks={n: m.sparsity_mask.detach().cpu() for n, m in _base_names(peft_model).items()},
                   method="sparselora-adapter")


def save_sparse_lora(peft_model: PeftModel, path: str | os.PathLike, **save_kwargs: Any) -> Path:
    """``peft_model.save_pretrained(path)`` plus the masks beside the adapter (``sparsity_masks.safetensors``).

    Every file the save creates gets mode ``0o666 & ~umask``, as ``open()`` gives, not the ``0o600`` of
    safetensors >= 0.8 (safetensors#782) that peft writes the adapter weights with. Files already in ``path``
    that the save leaves or rewrites in place keep their modes.
    """
    masks = peft_sparse_masks(peft_model)
    if not masks.masks:
        raise ValueError("save_sparse_lora: the model has no SparseLoRA layers (was the mapping registered?)")
    path = Path(path)
    before = file_identities(path)
    peft_model.save_pretrained(str(path), **save_kwargs)
    masks.save(path)
    follow_umask(path, only=[file for file, ident in file_identities(path).items() if before.get(file) != ident])
    return path


def load_sparse_lora(
    model: nn.Module,
    path: str | os.PathLike,
    masks: MaskSet | Mapping[str, torch.Tensor] | None = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
) -> PeftModel:
    """Load an adapter written by :func:`save_sparse_lora` onto the pruned base ``model`` as SparseLoRA.

    Checks (``ValueError``): every saved mask names a linear of ``model`` of the same shape whose weight has no
    non-zeros outside the mask; when ``masks`` (the base model's own) are given, they equal the saved ones.
    """
    path = Path(path)
    saved = MaskSet.load(path)
    if masks is not None:
        given = masks.masks if isinstance(masks, MaskSet) else masks
        differ = [n for n, m in saved.items() if n not in given or not torch.equal(given[n].cpu(), m.cpu())]
        if differ:
            raise ValueError(
                f"load_sparse_lora: the adapter at {path} was trained on different masks than the base model's: "
                f"{len(differ)} of {len(saved)} modules differ (e.g. {differ[0]!r})"
            )
    for name, mask in saved.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"load_sparse_lora: the base model has no module {name!r} named in {path}") from error
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != mask.shape:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise ValueError(f"load_sparse_lora: {name}: saved mask {tuple(mask.shape)} vs base weight {got}")
        outside = int(((weight.detach() != 0) & ~mask.to(weight.device)).sum())
        if outside:
            raise ValueError(
                f"load_sparse_lora: the base model's masks differ from the adapter's: {name} has {outside} "
                "non-zeros outside the saved mask (load the pruned model the adapter was trained on)"
            )
    config = LoraConfig.from_pretrained(str(path))
    register_sparse_lora(config, saved)
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)
