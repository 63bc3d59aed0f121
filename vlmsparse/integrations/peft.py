"""SparseLoRA through peft: ``get_peft_model`` with a ``LoraConfig`` builds masked LoRA layers; adapter files.

There is one SparseLoRA layer, :class:`vlmsparse.modules.sparse_lora.SparseLoRALinear`, a subclass of peft's
``lora.Linear``. peft's experimental custom-module mapping (``LoraConfig._register_custom_module``) maps
``nn.Linear`` to a factory that builds it for a module named in the mask set, and plain peft LoRA for targeted
modules without a mask. ``add_sparse_lora`` builds the same layer in place, without a ``PeftModel``.

Math (``s = lora_alpha / r``): ``y = x @ (W*M + s*(B@A)*M).T + b`` through the SparseLoRA op of
:mod:`vlmsparse.ops`; ``get_delta_weight = s*(B@A)*M`` and the layer's ``merge`` writes ``W*M + s*(B@A)*M``, so
peft's ``merge_and_unload`` keeps the pruned entries exactly zero.

Files: :func:`save_sparse_lora` writes a peft adapter folder (``adapter_config.json``,
``adapter_model.safetensors``, peft's keys) plus ``sparsity_masks.safetensors`` beside it, from a ``PeftModel``
or from a model whose adapters were added in place (``add_sparse_lora``, ``vlmsparse finetune``'s
``OUT/adapter``); :func:`load_sparse_lora` reads both, checks the masks against the base model (and against the
caller's masks, when given) and returns peft's ``PeftModel.from_pretrained`` with the mapping registered on the
saved config, so its layers are SparseLoRA again.

    config = sparse_lora_config(masks, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(model, config)       # or: add_sparse_lora(model, masks, r=8)
    ...train...
    save_sparse_lora(model, "adapter/")
    model = load_sparse_lora(base_model, "adapter/")
    merged = model.merge_and_unload()            # zeros of each weight == zeros of its mask
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import dispatch_default as _peft_dispatch_default
from torch import nn

from .._io import file_identities, follow_umask
from ..masks import MaskSet
from ..modules.sparse_linear import SparseLinear
from ..modules.sparse_lora import SparseLoRALinear

__all__ = [
    "SparseLoRAFactory",
    "register_sparse_lora",
    "sparse_lora_config",
    "peft_sparse_masks",
    "adapter_config",
    "save_sparse_lora",
    "load_sparse_lora",
]

logger = logging.getLogger(__name__)

class SparseLoRAFactory:
    """The value registered in ``LoraConfig._register_custom_module({nn.Linear: factory, SparseLinear: factory})``:
    builds :class:`~vlmsparse.modules.sparse_lora.SparseLoRALinear` for masked ``nn.Linear`` modules (with
    ``keep_dense``: their weight may be the dense one, see the layer), plain peft LoRA for unmasked ``nn.Linear``
    modules (logged). A ``SparseLinear`` target is refused with the in-place route to take instead (peft moves
    each new layer to its base's ``weight``, ``qweight`` or first parameter; a packed module has none of them)."""

    def __init__(self, masks: MaskSet | Mapping[str, torch.Tensor], keep_dense: bool = False) -> None:
        self.masks = dict(masks.masks if isinstance(masks, MaskSet) else masks)
        self.keep_dense = keep_dense

    def __call__(self, target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
        name = kwargs.get("target_name")
        if isinstance(target, SparseLinear):
            raise ValueError(
                f"SparseLoRA (peft): {name} is a SparseLinear; peft places adapters by the base module's weight, "
                "which a packed module does not have. Add adapters over a compressed model in place: "
                "vlmsparse.add_sparse_lora(model, None), save_sparse_lora(model, path), load_sparse_lora(model, path)"
            )
        if name in self.masks:
            mask = self.masks[name].to(target.weight.device)
            return SparseLoRALinear(target, mask, adapter_name=adapter_name, config=config,
                                    keep_dense=self.keep_dense, **kwargs)
        logger.info("SparseLoRA (peft): %s has no mask; plain LoRA", name)
        return _peft_dispatch_default(target, adapter_name, config=config, **kwargs)


def register_sparse_lora(config: LoraConfig, masks: MaskSet | Mapping[str, torch.Tensor],
                         keep_dense: bool = False) -> LoraConfig:
    """Register the SparseLoRA mapping for ``nn.Linear`` and packed ``SparseLinear`` on ``config`` (in place;
    returned). ``keep_dense``: the masked ``nn.Linear`` weights may be the dense ones (masked in the forward; for
    distillation with ``teacher_mode``). The mapping is not saved with the config: after loading, register again
    (:func:`load_sparse_lora` does)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"register_sparse_lora needs a peft LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("SparseLoRA (peft): use_dora=True is not supported")
    factory = SparseLoRAFactory(masks, keep_dense)
    config._register_custom_module({nn.Linear: factory, SparseLinear: factory})
    return config


def sparse_lora_config(masks: MaskSet | Mapping[str, torch.Tensor], keep_dense: bool = False,
                       **lora_config_kwargs: Any) -> LoraConfig:
    """``LoraConfig(**lora_config_kwargs)`` with the SparseLoRA mapping registered (``keep_dense``: see
    :func:`register_sparse_lora`). Without ``target_modules`` the masked modules are targeted (by their full
    names)."""
    mask_map = masks.masks if isinstance(masks, MaskSet) else masks
    lora_config_kwargs.setdefault("target_modules", sorted(mask_map))
    return register_sparse_lora(LoraConfig(**lora_config_kwargs), masks, keep_dense)


def _sparse_layers(model: nn.Module) -> dict[str, SparseLoRALinear]:
    """The SparseLoRA layers of a ``PeftModel`` or of a model with adapters added in place, by module name of the
    base model."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {n: m for n, m in base.named_modules() if isinstance(m, SparseLoRALinear)}


def peft_sparse_masks(model: nn.Module) -> MaskSet:
    """The masks of the SparseLoRA layers (of a ``PeftModel`` or a model from ``add_sparse_lora``), keyed by module
    names of the base model."""
    return MaskSet(masks={n: m.keep_mask().detach().cpu() for n, m in _sparse_layers(model).items()},
                   method="sparselora-adapter")


def _most_common(values: list) -> Any:
    return max(sorted(set(values), key=str), key=values.count)


def adapter_config(model: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """The ``LoraConfig`` that rebuilds adapter ``adapter_name`` of the SparseLoRA layers of ``model`` (added in
    place by ``add_sparse_lora``): ``target_modules`` their full names, ``r`` / ``lora_alpha`` the most common
    values and ``rank_pattern`` / ``alpha_pattern`` (escaped full names) for the others."""
    layers = {n: m for n, m in _sparse_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"adapter_config: the model has no SparseLoRA layer with an adapter {adapter_name!r}")
    ranks = {n: m.r[adapter_name] for n, m in layers.items()}
    alphas = {n: m.lora_alpha[adapter_name] for n, m in layers.items()}
    dropouts = {getattr(m.lora_dropout[adapter_name], "p", 0.0) for m in layers.values()}
    rslora = {m.use_rslora[adapter_name] for m in layers.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(f"adapter_config: the layers differ in lora_dropout {sorted(dropouts)} or use_rslora "
                         f"{sorted(rslora)}; one LoraConfig holds one value of each")
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropouts.pop(), use_rslora=rslora.pop(), target_modules=sorted(layers),
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha},
    )


def _saved_key(module: str, matrix: str) -> str:
    """peft's key of adapter matrix ``matrix`` (``lora_A`` / ``lora_B``) of ``module`` in an adapter file (the
    adapter name dropped, as ``get_peft_model_state_dict`` writes it)."""
    return f"base_model.model.{module}.{matrix}.weight"


def _save_in_place_adapter(model: nn.Module, path: Path, adapter_name: str) -> None:
    """What ``PeftModel.save_pretrained`` writes, for adapters added in place: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with peft's saved keys (``base_model.model.<module>.lora_A.weight``: the adapter
    name dropped, as ``get_peft_model_state_dict`` does)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    config = adapter_config(model, adapter_name)
    tensors = {}
    for name, layer in _sparse_layers(model).items():
        if adapter_name in layer.lora_A:
            for key, layers in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                tensors[_saved_key(name, key)] = layers[adapter_name].weight.detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def save_sparse_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                     **save_kwargs: Any) -> Path:
    """Save the SparseLoRA adapter of ``model`` as a peft adapter folder plus the masks beside it
    (``sparsity_masks.safetensors``); :func:`load_sparse_lora` (or ``PeftModel.from_pretrained`` with
    :func:`register_sparse_lora`'d config) reads it back.

    ``model``: a ``PeftModel`` (``model.save_pretrained(path, **save_kwargs)``, every adapter) or a model whose
    adapters ``add_sparse_lora`` / ``vlmsparse finetune`` added in place (the same two files for adapter
    ``adapter_name``, config from :func:`adapter_config`). Only ``method="sparselora"`` layers save: the
    ``lora`` / ``lora-remask`` baselines compute another function than the one a loaded SparseLoRA layer would.

    Every file the save creates gets mode ``0o666 & ~umask``, as ``open()`` gives, not the ``0o600`` of
    safetensors >= 0.8 (safetensors#782) that the adapter weights are written with. Files already in ``path``
    that the save leaves or rewrites in place keep their modes.
    """
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError("save_sparse_lora: the model has no SparseLoRA layers (was the mapping registered?)")
    baselines = sorted(n for n, m in layers.items() if m.method != "sparselora")
    if baselines:
        raise ValueError(f"save_sparse_lora: {len(baselines)} layers use method {layers[baselines[0]].method!r} "
                         f"(e.g. {baselines[0]!r}); only method='sparselora' adapters save as SparseLoRA adapters")
    if not isinstance(model, PeftModel) and save_kwargs:
        raise ValueError(f"save_sparse_lora: {sorted(save_kwargs)} are PeftModel.save_pretrained arguments; this model "
                         "has its adapters in place")
    masks = peft_sparse_masks(model)
    path = Path(path)
    before = file_identities(path)
    if isinstance(model, PeftModel):
        model.save_pretrained(str(path), **save_kwargs)
    else:
        _save_in_place_adapter(model, path, adapter_name)
    masks.save(path)
    follow_umask(path, only=[file for file, ident in file_identities(path).items() if before.get(file) != ident])
    return path


def load_sparse_lora(
    model: nn.Module,
    path: str | os.PathLike,
    masks: MaskSet | Mapping[str, torch.Tensor] | None = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
) -> PeftModel | nn.Module:
    """Load an adapter written by :func:`save_sparse_lora` onto the pruned base ``model`` as SparseLoRA: peft's
    ``PeftModel``; for a compressed model whose adapted modules are packed 2:4 ``SparseLinear`` modules, the
    adapters are added in place (as ``add_sparse_lora``) and ``model`` itself is returned.

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
        weight = module.dense_weight() if isinstance(module, SparseLinear) else getattr(module, "weight", None)
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
    packed = [n for n in saved if isinstance(model.get_submodule(n), SparseLinear)]
    if packed:
        if len(packed) != len(saved):
            raise ValueError(f"load_sparse_lora: {len(packed)} of the {len(saved)} adapted modules are packed "
                             "SparseLinear modules and the others nn.Linear; compress all of them or none")
        return _load_in_place(model, path, config, saved, adapter_name, is_trainable)
    register_sparse_lora(config, saved)
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable)


def _load_in_place(model: nn.Module, path: Path, config: LoraConfig, saved: MaskSet, adapter_name: str,
                   is_trainable: bool) -> nn.Module:
    """The adapter folder ``path`` added in place onto the packed 2:4 SparseLinear modules of ``model``
    (``add_sparse_lora`` with the config's ranks and alphas per module, then the saved weights); ``model``."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    from ..pipeline.lora import add_sparse_lora

    if config.use_rslora or config.use_dora or config.lora_bias:
        raise ValueError(f"load_sparse_lora: {path} uses rsLoRA, DoRA or a LoRA bias; adapters over packed modules "
                         "are plain SparseLoRA")
    weights_file = path / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        raise ValueError(f"load_sparse_lora: {path} has no {SAFETENSORS_WEIGHTS_NAME} (written by save_sparse_lora)")

    def per_module(pattern: Mapping[str, float], default: float):
        return lambda name, module: pattern.get(get_pattern_key(pattern.keys(), name), default)

    add_sparse_lora(model, saved, r=per_module(config.rank_pattern, config.r),
                    lora_alpha=per_module(config.alpha_pattern, config.lora_alpha),
                    lora_dropout=config.lora_dropout, adapter_name=adapter_name)
    tensors = load_file(str(weights_file))
    with torch.no_grad():
        for name in saved:
            layer = model.get_submodule(name)
            for key, layers in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                stored = tensors.get(_saved_key(name, key))
                weight = layers[adapter_name].weight
                if stored is None or stored.shape != weight.shape:
                    got = None if stored is None else tuple(stored.shape)
                    raise ValueError(f"load_sparse_lora: {path}: {name}.{key} is {got}, the layer needs "
                                     f"{tuple(weight.shape)}")
                weight.copy_(stored)
            if not is_trainable:
                for layers in (layer.lora_A, layer.lora_B):
                    layers[adapter_name].weight.requires_grad_(False)
    return model
