"""SparseLoRALinear: LoRA whose update is multiplied by the pruning mask, as a peft LoRA layer (layer 3).

With ``W`` the frozen pruned weight ``[out, in]``, ``M`` its bool keep-mask, ``A [r, in]``, ``B [out, r]`` and
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``):

    y = x @ (W*M + s*(B@A)*M).T + b           merge:  W' = W*M + s*(B@A)*M

so the zeros of the merged weight are the zeros of ``M``, bit for bit (a 2:4 mask stays 2:4). Forward and
backward go through the SparseLoRA op of :mod:`vlmsparse.ops` (a ``torch.library`` custom op under
``torch.compile``), which keeps no full-size tensor alive between them; the module checks its tensors once
(construction, a new adapter, ``.to()``, a new ``sparsity_mask``) and calls the op's unchecked entry.

The class is a subclass of peft's ``lora.Linear``, so there is one layer for both ways of building it:
:func:`vlmsparse.pipeline.lora.add_sparse_lora` swaps it in place (no ``PeftModel``), and peft's
``get_peft_model`` builds it through :mod:`vlmsparse.integrations.peft`. It has peft's attributes and state-dict
layout: per-adapter ``lora_A`` / ``lora_B`` / ``lora_dropout`` ModuleDicts and ``r`` / ``lora_alpha`` /
``scaling`` dicts (keys ``lora_A.<adapter>.weight``), ``base_layer``, ``merge(safe_merge, adapter_names)``,
``unmerge()``, ``get_delta_weight(adapter)``, ``merged``, ``disable_adapters``, several adapters; plus the
persistent buffer ``sparsity_mask``. State dicts of the earlier own layer (``lora_A.weight``, ``lora_B.weight``,
``mask``) load into a module with one adapter (keys migrated in ``_load_from_state_dict``).

``method`` selects the variant the research compares:

- ``"sparselora"``: the masked update above;
- ``"lora"``: plain LoRA ``y = x @ W.T + s * x @ A.T @ B.T + b``, merged densely (the sparsity is lost);
- ``"lora-remask"``: plain LoRA in training, merged as ``(W + s*B@A) * M``.

**Packed 2:4 base.** ``base_layer`` may also be a :class:`~vlmsparse.modules.sparse_linear.SparseLinear` with
backend ``packed24`` (for example from ``load_compressed(..., as_sparse=True)``): the frozen weight then stays in
the packed format (values + 2-bit indices, 9/16 of the dense fp16 bytes, and no bool mask: ``M`` is the packed
pattern, :meth:`SparseLoRALinear.keep_mask`), the forward and backward run the fused packed op
(``ops.packed24_lora_linear``: ``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b``), and merging writes the merged
entries back into the packed values, so the merged module is packed 2:4 again. Only ``method="sparselora"`` without
``keep_dense`` applies (the other methods need a dense weight).

``keep_dense=True`` lets ``base_layer.weight`` hold the dense, unpruned weight (the mask is applied in the
forward); :func:`teacher_mode` then runs the module as the dense teacher (adapter and mask off) for
distillation, without a second copy of the model. peft's ``disable_adapters`` runs the pruned base ``W*M``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from torch import nn

from .. import ops
from ..kernels.checks import check_bias, check_features, check_lora, check_packed, check_same_device
from ..kernels.reference import effective_weight_ref
from ..sparse24 import Packed24, pack24, unpack24, unpack24_mask, unpack24_with_mask
from .sparse_linear import SparseLinear

__all__ = ["SparseLoRALinear", "METHODS", "check_mask", "migrate_state_dict", "teacher_mode",
           "disable_adapter_and_mask", "sparse_lora_modules"]

logger = logging.getLogger(__name__)

METHODS = ("sparselora", "lora", "lora-remask")

# keys of the earlier own layer (one adapter, bias-free nn.Linear adapters, buffer ``mask``) -> this layer's
_OLD_KEYS = {"lora_A.weight": "lora_A.{}.weight", "lora_B.weight": "lora_B.{}.weight", "mask": "sparsity_mask"}


def check_mask(mask: torch.Tensor, weight: torch.Tensor, keep_dense: bool = False, name: str = "",
               zeros: bool = True) -> None:
    """The mask is bool, of the weight's shape and device; with ``zeros`` (and not ``keep_dense``) the weight is
    zero outside it (a full pass over the weight: done at construction, not when tensors move). ValueError
    otherwise."""
    where = f" for {name!r}" if name else ""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"SparseLoRALinear: mask{where} must be a bool tensor, got {got}")
    if mask.shape != weight.shape:
        raise ValueError(
            f"SparseLoRALinear: mask{where} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}; "
            "they must be equal ([out, in])"
        )
    if mask.device != weight.device:
        raise ValueError(
            f"SparseLoRALinear: mask{where} is on {mask.device}, the weight on {weight.device}; move the mask "
            "(or the model) so both are on the same device"
        )
    if zeros and not keep_dense:
        outside = int(((weight != 0) & ~mask).sum())
        if outside:
            raise ValueError(
                f"SparseLoRALinear: the base weight{where} has {outside} non-zeros outside the mask; pass the "
                "pruned weight (W*M) with its mask, or keep_dense=True to keep a dense weight for distillation"
            )


def _check_adapter_args(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"SparseLoRALinear: r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"SparseLoRALinear: lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"SparseLoRALinear: lora_dropout must be in [0, 1), got {lora_dropout!r}")


def _check_config(config: LoraConfig) -> None:
    """What the masked op computes: plain LoRA adapters on an ``[out, in]`` weight (rsLoRA scaling allowed)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"SparseLoRALinear: config must be a peft LoraConfig, got {type(config).__name__}")
    unsupported = {"use_dora": config.use_dora, "lora_bias": config.lora_bias,
                   "fan_in_fan_out": config.fan_in_fan_out}
    bad = [f"{k}=True" for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"SparseLoRALinear: {', '.join(bad)} is not supported (plain LoRA adapters on nn.Linear "
                         "weights [out, in] only)")


def _repack_at_mask(base: SparseLinear, mask: torch.Tensor, name: str = "") -> None:
    """Make the packed pattern of ``base`` the given mask (the fused op masks the update with the pattern). Packing
    by non-zeros may have stored other positions where a kept weight is exactly zero; those are re-packed at the
    mask's positions, in place (same dense weight)."""
    pattern = unpack24_mask(Packed24(base.values, base.meta, base.in_features))
    check_mask(mask, pattern, keep_dense=True, name=name)  # dtype, shape, device
    if torch.equal(mask, pattern):
        return
    try:
        repacked = pack24(unpack24(Packed24(base.values, base.meta, base.in_features)), mask)
    except ValueError as error:
        where = f" for {name!r}" if name else ""
        raise ValueError(f"SparseLoRALinear: the mask{where} does not fit the packed 2:4 base ({error}); pass "
                         "mask=None (the packed pattern is the mask) or the 2:4 mask it was pruned with") from None
    base.values, base.meta = repacked.values, repacked.meta


def _check_packed_base(base: SparseLinear, method: str, keep_dense: bool) -> None:
    """A SparseLinear base must hold the packed 2:4 format alone (the fused op reads values + meta)."""
    if base.backend != "packed24":
        raise ValueError(f"SparseLoRALinear over a SparseLinear needs its packed 2:4 format (backend 'packed24'), "
                         f"got backend {base.backend!r}; wrap the nn.Linear instead (SparseLinear.to_linear())")
    if base.dense_below:
        raise ValueError("SparseLoRALinear over a SparseLinear with dense_below keeps a second, dense copy that "
                         "merging would leave stale; build the SparseLinear with dense_below=0")
    if method != "sparselora" or keep_dense:
        raise ValueError(f"SparseLoRALinear over a packed 2:4 SparseLinear computes method='sparselora' without "
                         f"keep_dense; got method={method!r}, keep_dense={keep_dense} (those need a dense weight: "
                         "wrap the nn.Linear from SparseLinear.to_linear())")


class SparseLoRALinear(_PeftLoraLinear):
    """A pruned ``nn.Linear`` (``base_layer``) with keep-mask ``sparsity_mask`` and trainable low-rank updates.

    Args:
        base_layer: the ``nn.Linear`` to wrap (its weight is frozen; its bias keeps its ``requires_grad``), or a
            packed 2:4 :class:`~vlmsparse.modules.sparse_linear.SparseLinear` (see the module docstring).
        mask: bool keep-mask ``[out, in]`` on the weight's device (``True`` = kept). For a packed base ``None``
            (the packed pattern) or a 2:4 mask holding every non-zero (the base is re-packed at its positions).
        r: rank, > 0.  lora_alpha: scaling numerator, ``scaling = lora_alpha / r``.
        lora_dropout: dropout probability on the adapter's input, in [0, 1) (default 0).
        method: ``"sparselora"`` (default), ``"lora"`` or ``"lora-remask"`` (see the module docstring).
        keep_dense: the base weight may hold the dense weight (masked in the forward); enables
            :func:`teacher_mode`. Without it the base weight must be zero outside the mask.
        init_lora_weights: ``True`` (default): peft's init (A Kaiming-uniform, B zero, so the update starts at 0);
            ``False``: both random (tests).
        backend: ``None`` (resolved per call, see :mod:`vlmsparse.ops`) or a backend name.
        adapter_name: the first adapter's name (peft's ``"default"``).
        config: a peft ``LoraConfig`` (peft's factory passes it, with ``r`` / ``lora_alpha`` per module); its
            ``lora_dropout`` / ``init_lora_weights`` are used, so those two arguments must then stay ``None``.
        **kwargs: what peft's factory passes on (``target_name``, ...).

    Adapters are float32 over a float16 / bfloat16 base (as peft's ``autocast_adapter_dtype``).
    """

    def __init__(
        self,
        base_layer: nn.Linear | SparseLinear,
        mask: torch.Tensor | None,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float | None = None,
        method: str = "sparselora",
        keep_dense: bool = False,
        init_lora_weights: bool | None = None,
        backend: str | None = None,
        *,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
        **kwargs: Any,
    ) -> None:
        packed = isinstance(base_layer, SparseLinear)
        if not packed and not isinstance(base_layer, nn.Linear):
            raise ValueError("SparseLoRALinear wraps an nn.Linear or a packed 2:4 SparseLinear, got "
                             f"{type(base_layer).__name__}")
        base = base_layer
        if method not in METHODS:
            raise ValueError(f"SparseLoRALinear: method must be one of {', '.join(METHODS)}, got {method!r}")
        if backend is not None:
            ops._check_name(backend, "SparseLoRALinear backend")
        if config is None:
            lora_dropout = 0.0 if lora_dropout is None else lora_dropout
            _check_adapter_args(r, lora_alpha, lora_dropout)
            config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
                                init_lora_weights=True if init_lora_weights is None else init_lora_weights)
        elif lora_dropout is not None or init_lora_weights is not None:
            raise ValueError("SparseLoRALinear: with a LoraConfig, lora_dropout and init_lora_weights come from it; "
                             "leave those arguments None")
        name = kwargs.get("target_name") or ""
        if packed:
            _check_packed_base(base, method, keep_dense)
            if mask is not None:
                _repack_at_mask(base, mask, name)
        elif mask is None:
            raise ValueError("SparseLoRALinear: an nn.Linear base needs its bool keep-mask [out, in] (mask=None "
                             "only for a packed 2:4 SparseLinear, whose pattern is the mask)")
        else:
            check_mask(mask, base.weight, keep_dense, name=name)
        self.packed_base = packed
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        self.method, self.keep_dense, self.backend = method, keep_dense, backend
        self.teacher = False
        self._unmerged_weight: torch.Tensor | None = None  # the pre-merge weight (packed: values), see merge()
        if not packed:
            base.weight.requires_grad_(False)
            self.register_buffer("sparsity_mask", mask.detach().clone(), persistent=True)
        self._checked = True
        self._check_tensors(devices=True)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, SparseLinear):  # peft reads nn.Linear's fields; SparseLinear has the same names
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    @property
    def lora_variants(self) -> dict:
        """No peft variant (DoRA, ...): the masked op computes plain LoRA adapters only."""
        return {(): None}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        """peft's ``update_layer`` (adds adapter ``adapter_name``) with the arguments checked, the adapter kept
        in float32 over a half-precision base, and the tensors checked."""
        _check_config(config)
        _check_adapter_args(r, lora_alpha, config.lora_dropout)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if self.__dict__.get("_checked"):  # a later adapter (the first is checked in __init__)
            self._check_tensors(devices=True)

    def keep_mask(self) -> torch.Tensor:
        """The bool keep-mask ``[out, in]``: the buffer ``sparsity_mask``, or for a packed 2:4 base the pattern its
        indices describe (built on each call: the packed module stores no bool mask)."""
        if self.packed_base:
            return unpack24_mask(self._packed())
        return self.sparsity_mask

    def _packed(self, values: torch.Tensor | None = None) -> Packed24:
        base = self.base_layer
        return Packed24(base.values if values is None else values, base.meta, self.in_features)

    def _base_tensor(self) -> torch.Tensor:
        """The frozen base tensor that sets device and dtype: the weight, or the packed values."""
        base = self.base_layer
        return base.values if self.packed_base else base.weight

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """peft's move (device and dtype of the base) with the adapter in float32 over a half-precision base; for a
        packed base, whose ``.weight`` peft looks for is absent, device and dtype come from the packed values."""
        base = self._base_tensor()
        if device is None and self.packed_base:
            device = base.device
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        if dtype.is_floating_point:
            for layers in (self.lora_A, self.lora_B):
                if adapter_name in layers:
                    layers[adapter_name].to(dtype)

    # ------------------------------------------------------------------------------------------ checks
    def _check_tensors(self, devices: bool = False) -> None:
        """What the functional op checks on every call, checked here instead: shapes (mask or packed format and
        adapters against ``[out, in]``, bias) and the mask dtype at construction, after ``.to()`` / ``.half()``
        (:meth:`_apply`) and when ``sparsity_mask`` is assigned; one device at construction only (loaders such as
        accelerate's move tensors one by one, through meta, so a passing mismatch is normal there). ``forward``
        then calls the unchecked op."""
        base = self.get_base_layer()
        what = "SparseLoRALinear"
        if self.packed_base:
            check_packed(base.values, base.meta, self.in_features, what)
            frozen = {"values": base.values, "meta": base.meta}
        else:
            weight, mask = base.weight, self.sparsity_mask
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
                check_mask(mask, weight, self.keep_dense, zeros=False)  # raises with the message
            frozen = {"weight": weight, "mask": mask}
        check_bias(base.bias, self.out_features, what)
        for name in self.lora_A:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            check_lora(A, B, self.out_features, self.in_features, what)
            if devices:
                check_same_device(what, **frozen, lora_A=A, lora_B=B, bias=base.bias)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if self._unmerged_weight is not None:  # the kept pre-merge weight moves (and casts) with the module
            self._unmerged_weight = fn(self._unmerged_weight)
        if self.__dict__.get("_checked"):
            self._check_tensors()
        return out

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "sparsity_mask" and self.__dict__.get("_checked"):  # replaced after construction
            self._check_tensors()

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{a}: r={self.r[a]}" for a in self.lora_A)
        base = ", base=packed 2:4" if self.packed_base else ""
        # a packed pattern keeps 2 of every 4 inputs: no need to unpack it (printing a large model stays cheap)
        density = 0.5 if self.packed_base else self.sparsity_mask.float().mean().item()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {ranks}, method={self.method!r}, "
            f"keep_dense={self.keep_dense}, density={density:.3f}, merged={self.merged}{base}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Old-layout keys (``lora_A.weight``, ``lora_B.weight``, ``mask``) are renamed to this layout for a module
        with one adapter; adapters trained on other masks do not load: a saved ``sparsity_mask`` must equal this
        module's."""
        problem = self._rename_old_keys(state_dict, prefix)
        if problem:
            error_msgs.append(problem)
            return
        saved = state_dict.get(prefix + "sparsity_mask")
        mask = self.keep_mask() if saved is not None else None
        if saved is not None and (saved.shape != mask.shape or not torch.equal(saved.to(mask.device).bool(), mask)):
            differ = int((saved.to(mask.device).bool() != mask).sum()) if saved.shape == mask.shape else "all"
            error_msgs.append(
                f"{prefix}sparsity_mask: the state dict was trained on a different mask ({differ} entries differ); "
                "load it onto the model pruned with the same masks"
            )
            return
        if self.packed_base and saved is not None:  # a dense-base state dict: its mask is this base's pattern
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "sparsity_mask"}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _rename_old_keys(self, state_dict: dict, prefix: str) -> str | None:
        """Rename, in place, this module's keys of the earlier own layer (``lora_A.weight``, ``lora_B.weight``,
        ``mask``) to this layout (``lora_A.<adapter>.weight``, ``sparsity_mask``); the problem, if any."""
        old = [k for k in _OLD_KEYS if prefix + k in state_dict]
        if not old:
            return None
        if len(self.lora_A) != 1:
            return (f"{prefix}: a state dict of the single-adapter layout ({prefix}{old[0]}) loads only into a module "
                    f"with one adapter; this one has {sorted(self.lora_A)}")
        adapter = next(iter(self.lora_A))
        for key in old:
            state_dict[prefix + _OLD_KEYS[key].format(adapter)] = state_dict.pop(prefix + key)
        return None

    # ------------------------------------------------------------------------------------------ forward
    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]

    def _masked_base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        if self.keep_dense:
            return effective_weight_ref(weight, self.sparsity_mask, None, None, 0.0)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y [..., out]`` for ``x [..., in]``: the base plus every active adapter's update (see the module
        docstring for the math of each method)."""
        if args or any(v is not None for v in kwargs.values()):
            raise NotImplementedError("SparseLoRALinear: no extra forward arguments (mixed-batch adapter_names, "
                                      f"variant arguments); got {len(args)} positional and {sorted(kwargs)}")
        if self.packed_base:
            return self._packed_forward(x)
        # Host cost matters for small layers: the attributes behind peft's properties are read directly
        # (base_layer is the nn.Linear itself, see __init__; merged = bool(merged_adapters)).
        base = self.base_layer
        weight, bias = base.weight, base.bias
        merged, disabled = bool(self.merged_adapters), self._disable_adapters
        if self.teacher:
            if merged:
                raise RuntimeError("teacher mode on a merged SparseLoRALinear: unmerge() first")
            return nn.functional.linear(x, weight, bias)  # dense weight when keep_dense, adapter off
        if disabled and merged:
            self.unmerge()
            merged = False
        if merged:
            return nn.functional.linear(x, weight, bias)
        active = [] if disabled else self._active()
        if self.method != "sparselora" or not active:
            result = nn.functional.linear(x, self._masked_base_weight(), bias)
            for a in active:
                A, B = self.lora_A[a], self.lora_B[a]
                lora_in = self.lora_dropout[a](x).to(A.weight.dtype)
                result = result + (B(A(lora_in)) * self.scaling[a]).to(result.dtype)
            return result
        # Tensors were checked once (_check_tensors); per call only x (new every call) and the frozen base.
        check_features(x, self.in_features, "SparseLoRALinear")
        ops._check_frozen(weight, "SparseLoRALinear")
        mask = self.sparsity_mask
        if len(active) == 1 and (not self.training or isinstance(self.lora_dropout[active[0]], nn.Identity)):
            a = active[0]
            return ops._sparse_lora_linear(x, weight, mask, self.lora_A[a].weight, self.lora_B[a].weight,
                                           self.scaling[a], bias, self.backend)
        # Dropout on the adapter input, or several adapters: y = x @ (W*M).T + b + sum_a s_a * drop_a(x) @ ((B_a@A_a)*M).T
        result = nn.functional.linear(x, self._masked_base_weight(), bias)
        zero = ops.zero_weight(self.out_features, self.in_features, weight)
        for a in active:
            result = result + ops._sparse_lora_linear(self.lora_dropout[a](x), zero, mask, self.lora_A[a].weight,
                                                      self.lora_B[a].weight, self.scaling[a], None, self.backend)
        return result

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward over a packed 2:4 base: the fused op for one adapter without dropout, else the packed base
        plus each adapter's masked update (the fused op over zero values). Merged, disabled or teacher: the base
        alone (a packed base holds the pruned weight, so the teacher is the pruned model)."""
        base = self.base_layer
        buffers = base._buffers
        values, meta, bias = buffers["values"], buffers["meta"], buffers["bias"]
        active = [] if (self._disable_adapters or self.teacher or self.merged_adapters) else self._active()
        if self._disable_adapters and self.merged_adapters:
            self.unmerge()
        if not active:
            return base(x)
        check_features(x, self.in_features, "SparseLoRALinear")
        if len(active) == 1 and (not self.training or isinstance(self.lora_dropout[active[0]], nn.Identity)):
            a = active[0]
            return ops._packed24_lora_linear(x, values, meta, self.lora_A[a].weight, self.lora_B[a].weight,
                                             self.scaling[a], bias, self.backend)
        result = base(x)
        zero = ops.zero_weight(values.shape[0], values.shape[1], values)
        for a in active:
            result = result + ops._packed24_lora_linear(self.lora_dropout[a](x), zero, meta, self.lora_A[a].weight,
                                                        self.lora_B[a].weight, self.scaling[a], None, self.backend)
        return result

    # ------------------------------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter: str = "default") -> torch.Tensor:
        """The update merging ``adapter`` adds, ``[out, in]`` in the weight's dtype: ``s*(B@A)*M`` (sparselora,
        lora-remask) or ``s*(B@A)`` (lora)."""
        dtype = self._base_tensor().dtype
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight).mul(self.scaling[adapter]).to(dtype)
        if self.method == "lora":
            return delta
        return delta.masked_fill_(~self.keep_mask(), 0)

    @torch.no_grad()
    def merged_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The weight :meth:`merge` writes for ``adapter_names`` (default: the active adapters not merged yet):
        ``W*M + s*(B@A)*M`` per adapter, computed exactly as the unmerged forward does (so merged and unmerged
        outputs of one adapter agree bit for bit on the reference backend); ``W + s*B@A`` for ``lora``. Dense
        ``[out, in]`` (a packed base: its unpacked weight with the updates at the packed pattern)."""
        names = self._active() if adapter_names is None else adapter_names
        names = [a for a in names if a not in self.merged_adapters]
        if self.packed_base:
            merged, mask = unpack24_with_mask(self._packed())
            for a in names:
                merged = effective_weight_ref(merged, mask, self.lora_A[a].weight, self.lora_B[a].weight,
                                              self.scaling[a])
            return merged
        weight = self.get_base_layer().weight
        if self.method == "lora":
            merged = weight if self.merged else self._masked_base_weight()
            for a in names:
                A, B = self.lora_A[a].weight, self.lora_B[a].weight
                merged = torch.addmm(merged, B.to(weight.dtype), A.to(weight.dtype), alpha=self.scaling[a])
            return merged
        if not names:
            return effective_weight_ref(weight, self.sparsity_mask, None, None, 0.0)
        merged = weight
        for a in names:
            merged = effective_weight_ref(merged, self.sparsity_mask, self.lora_A[a].weight, self.lora_B[a].weight,
                                          self.scaling[a])
        return merged

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
              keep_original: bool = True) -> None:
        """Write the updates of ``adapter_names`` (default: the active adapters) into ``base_layer.weight``; adapters
        already merged are skipped (merging twice changes nothing). peft's ``merge_and_unload`` calls this.

        ``safe_merge=True`` computes the merged weight first and refuses (``ValueError``) when it holds NaN or
        inf, leaving the module unchanged. ``keep_original=True`` keeps the pre-merge weight so that
        :meth:`unmerge` restores it exactly (one extra weight until unmerge); otherwise unmerge subtracts
        the deltas (exact zeros outside the mask, rounding elsewhere).
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        names = [a for a in (self._active() if adapter_names is None else adapter_names)
                 if a in self.lora_A and a not in self.merged_adapters]
        if not names:
            logger.warning("SparseLoRALinear.merge: already merged (or no adapter); nothing to do")
            return
        new = self.merged_weight(names)
        if safe_merge and not bool(torch.isfinite(new).all()):
            bad = int((~torch.isfinite(new)).sum())
            raise ValueError(f"SparseLoRALinear.merge(safe_merge=True): the merged weight has {bad} NaN/inf entries")
        base = self.get_base_layer()
        if not self.merged:
            self._unmerged_weight = self._base_tensor().data if keep_original else None
        if self.packed_base:  # the merged entries sit at the packed pattern: same indices, new values
            base.values = pack24(new, self.keep_mask()).values
        else:
            base.weight.data = new
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter: the exact pre-merge weight when it was kept, else
        ``W' - sum of deltas``."""
        if not self.merged:
            logger.warning("SparseLoRALinear.unmerge: not merged; nothing to do")
            return
        base = self.get_base_layer()
        if self._unmerged_weight is not None:
            if self.packed_base:
                base.values = self._unmerged_weight
            else:
                base.weight.data = self._unmerged_weight
        elif self.packed_base:
            weight = unpack24(self._packed())
            for a in reversed(self.merged_adapters):
                weight = weight - self.get_delta_weight(a)
            base.values = pack24(weight, self.keep_mask()).values
        else:
            if self.keep_dense:
                raise RuntimeError("unmerge of a keep_dense module merged with keep_original=False: the dense "
                                   "weight is gone")
            weight = base.weight.data
            for a in reversed(self.merged_adapters):
                weight = weight - self.get_delta_weight(a)
            base.weight.data = weight
        self._unmerged_weight = None
        self.merged_adapters.clear()

    @torch.no_grad()
    def merged_base(self) -> nn.Linear | SparseLinear:
        """The base layer's kind with the merged weight of the active adapters: :meth:`to_linear` for an
        ``nn.Linear`` base, a packed 2:4 ``SparseLinear`` (the same indices, merged values) for a packed base; the
        module is left as it was."""
        if not self.packed_base:
            return self.to_linear()
        return SparseLinear(self._merged_dense_weight(), self.get_base_layer().bias, backend="packed24")

    def _merged_dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight with the active adapters merged: the base's own when merged already (a new
        tensor), else :meth:`merged_weight`."""
        if not self.merged:
            return self.merged_weight()
        return unpack24(self._packed()) if self.packed_base else self.get_base_layer().weight.detach().clone()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight of the active adapters (and the base bias); the module is
        left as it was."""
        base = self.get_base_layer()
        weight = self._merged_dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=not self.packed_base and base.weight.requires_grad)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
        return linear

    @torch.no_grad()
    def to_base_linear(self) -> nn.Linear | SparseLinear:
        """The wrapped base layer (``nn.Linear`` or packed ``SparseLinear``) without the adapters (unmerged first
        when merged): the inverse of wrapping."""
        if self.merged:
            self.unmerge()
        return self.get_base_layer()


def sparse_lora_modules(model: nn.Module) -> Iterator[tuple[str, SparseLoRALinear]]:
    """``(name, module)`` for every :class:`SparseLoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLoRALinear):
            yield name, module


def migrate_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` (or a part of it, such as the trainable tensors of a finetune checkpoint) with the keys the
    earlier own layer wrote (``<module>.lora_A.weight``, ``<module>.lora_B.weight``, ``<module>.mask``) renamed to
    this layout for every :class:`SparseLoRALinear` of ``model`` (``<module>.lora_A.<adapter>.weight``,
    ``<module>.sparsity_mask``); other keys unchanged. ``Module.load_state_dict`` does this by itself."""
    out = dict(state_dict)
    for name, module in sparse_lora_modules(model):
        problem = module._rename_old_keys(out, f"{name}." if name else "")
        if problem:
            raise ValueError(f"migrate_state_dict: {problem}")
    return out


@contextlib.contextmanager
def teacher_mode(model: nn.Module, strict: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` as the dense teacher: every :class:`SparseLoRALinear` uses its dense base weight with
    the adapter and mask off. With ``strict`` every module must have ``keep_dense=True`` (else its "dense"
    weight is the pruned one: ``ValueError``). Use under ``torch.no_grad()`` for distillation targets."""
    modules = [m for _, m in sparse_lora_modules(model)]
    if strict:
        missing = [n for n, m in sparse_lora_modules(model) if not m.keep_dense]
        if missing:
            raise ValueError(
                f"teacher_mode: {len(missing)} SparseLoRALinear modules keep no dense weight (e.g. {missing[0]!r}); "
                "build them with keep_dense=True, or pass strict=False to run the pruned model without adapters"
            )
    previous = [m.teacher for m in modules]
    for m in modules:
        m.teacher = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.teacher = was


disable_adapter_and_mask = teacher_mode
