"""SparseLoRALinear: LoRA whose update is multiplied by the pruning mask (layer 3).

With ``W`` the frozen pruned weight ``[out, in]``, ``M`` its bool keep-mask, ``A [r, in]``, ``B [out, r]`` and
``s = lora_alpha / r``:

    y = x @ (W*M + s*(B@A)*M).T + b           merge:  W' = W*M + s*(B@A)*M

so the zeros of the merged weight are the zeros of ``M``, bit for bit (a 2:4 mask stays 2:4). Forward and
backward go through the SparseLoRA op of :mod:`vlmsparse.ops` (a ``torch.library`` custom op under
``torch.compile``), which keeps no full-size tensor alive between them; the module checks its tensors once
(construction, ``.to()``, a new ``mask``) and calls the op's unchecked entry. Names follow peft (``base_layer``,
``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout``, ``merge``, ``unmerge``,
``get_delta_weight``, ``merged``); ``lora_A`` / ``lora_B`` are bias-free ``nn.Linear`` so the state-dict keys are ``lora_A.weight`` / ``lora_B.weight`` as in peft adapters.

``method`` selects the variant the research compares:

- ``"sparselora"``: the masked update above;
- ``"lora"``: plain LoRA ``y = x @ W.T + s * x @ A.T @ B.T + b``, merged densely (the sparsity is lost);
- ``"lora-remask"``: plain LoRA in training, merged as ``(W + s*B@A) * M``.

``keep_dense=True`` lets ``base_layer.weight`` hold the dense, unpruned weight (the mask is applied in the
forward); :func:`teacher_mode` then runs the module as the dense teacher (adapter and mask off) for
distillation, without a second copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from .. import ops
from ..kernels.checks import check_bias, check_features, check_lora, check_same_device
from ..kernels.reference import effective_weight_ref

__all__ = ["SparseLoRALinear", "METHODS", "teacher_mode", "disable_adapter_and_mask", "sparse_lora_modules"]

logger = logging.getLogger(__name__)

METHODS = ("sparselora", "lora", "lora-remask")


def _check_mask(mask: torch.Tensor, weight: torch.Tensor, keep_dense: bool, name: str = "",
                zeros: bool = True) -> None:
    """The mask is bool, of the weight's shape and device; with ``zeros`` (and not ``keep_dense``) the weight is
    zero outside it (a full pass over the weight: done at construction, not when tensors move)."""
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


class SparseLoRALinear(nn.Module):
    """A pruned ``nn.Linear`` (``base_layer``) with keep-mask ``mask`` and a trainable low-rank update.

    Args:
        base_layer: the ``nn.Linear`` to wrap (its weight is frozen; its bias keeps its ``requires_grad``).
        mask: bool keep-mask ``[out, in]`` on the weight's device (``True`` = kept).
        r: rank, > 0.  lora_alpha: scaling numerator, ``scaling = lora_alpha / r``.
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        method: ``"sparselora"`` (default), ``"lora"`` or ``"lora-remask"`` (see the module docstring).
        keep_dense: the base weight may hold the dense weight (masked in the forward); enables
            :func:`teacher_mode`. Without it the base weight must be zero outside the mask.
        init_lora_weights: ``True``: peft's init (A Kaiming-uniform, B zero, so the update starts at 0);
            ``False``: both random (tests).
        backend: ``None`` (resolved per call, see :mod:`vlmsparse.ops`) or a backend name.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        mask: torch.Tensor,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        method: str = "sparselora",
        keep_dense: bool = False,
        init_lora_weights: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"SparseLoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"SparseLoRALinear: r must be a positive int, got {r!r}")
        if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
            raise ValueError(f"SparseLoRALinear: lora_alpha must be a positive number, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"SparseLoRALinear: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if method not in METHODS:
            raise ValueError(f"SparseLoRALinear: method must be one of {', '.join(METHODS)}, got {method!r}")
        if backend is not None:
            ops._check_name(backend, "SparseLoRALinear backend")
        weight = base_layer.weight
        _check_mask(mask, weight, keep_dense)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.register_buffer("mask", mask.detach().clone(), persistent=True)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.method, self.keep_dense, self.backend = method, keep_dense, backend
        # Adapters in float32 when the base is half precision (as peft's autocast_adapter_dtype).
        adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters(init_lora_weights)
        self.merged = False
        self.teacher = False
        self._unmerged_weight: torch.Tensor | None = None
        self._check_tensors(devices=True)

    # ------------------------------------------------------------------------------------------ checks
    def _check_tensors(self, devices: bool = False) -> None:
        """What the functional op checks on every call, checked here instead: shapes (mask and adapters against
        ``[out, in]``, bias) and the mask dtype at construction, after ``.to()`` / ``.half()`` (:meth:`_apply`) and
        when ``mask`` is assigned; one device at construction only (loaders such as accelerate's move tensors one
        by one, through meta, so a passing mismatch is normal there). ``forward`` then calls the unchecked op."""
        weight = self.base_layer.weight
        what = "SparseLoRALinear"
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.shape != weight.shape:
            _check_mask(self.mask, weight, self.keep_dense, zeros=False)  # raises with the message
        check_lora(self.lora_A.weight, self.lora_B.weight, self.out_features, self.in_features, what)
        check_bias(self.base_layer.bias, self.out_features, what)
        if devices:
            check_same_device(what, weight=weight, mask=self.mask, lora_A=self.lora_A.weight,
                              lora_B=self.lora_B.weight, bias=self.base_layer.bias)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._check_tensors()
        return out

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "mask" and "lora_B" in self._modules:  # replaced after construction
            self._check_tensors()

    # ------------------------------------------------------------------------------------------ parameters
    def reset_lora_parameters(self, init_lora_weights: bool = True) -> None:
        """peft's init: ``A`` Kaiming-uniform (a=sqrt(5)), ``B`` zero; with ``False`` B is random too."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (pruned, or dense with ``keep_dense``; merged after :meth:`merge`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, method={self.method!r}, keep_dense={self.keep_dense}, "
            f"density={self.mask.float().mean().item():.3f}, merged={self.merged}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Adapters trained on other masks do not load: a saved ``mask`` must equal this module's."""
        saved = state_dict.get(prefix + "mask")
        if saved is not None and (saved.shape != self.mask.shape
                                  or not torch.equal(saved.to(self.mask.device).bool(), self.mask)):
            differ = int((saved.to(self.mask.device).bool() != self.mask).sum()) if saved.shape == self.mask.shape \
                else "all"
            error_msgs.append(
                f"{prefix}mask: the state dict was trained on a different mask ({differ} entries differ); "
                "load it onto the model pruned with the same masks"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------------------ forward
    def _masked_base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if self.keep_dense:
            return effective_weight_ref(weight, self.mask, None, None, 0.0)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y [..., out]`` for ``x [..., in]``; see the module docstring for the math of each method."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.teacher:
            if self.merged:
                raise RuntimeError("teacher mode on a merged SparseLoRALinear: unmerge() first")
            return nn.functional.linear(x, weight, bias)  # dense weight when keep_dense, adapter off
        if self.merged:
            return nn.functional.linear(x, weight, bias)
        A, B = self.lora_A.weight, self.lora_B.weight
        if self.method != "sparselora":
            base = nn.functional.linear(x, self._masked_base_weight(), bias)
            lora_in = self.lora_dropout(x).to(A.dtype)
            return base + (self.lora_B(self.lora_A(lora_in)) * self.scaling).to(base.dtype)
        # Tensors were checked once (_check_tensors); per call only x (new every call) and the frozen base.
        check_features(x, self.in_features, "SparseLoRALinear")
        ops._check_frozen(weight, "SparseLoRALinear")
        if self.lora_dropout_p > 0 and self.training:
            # Dropout applies to the adapter's input only: y = x @ (W*M).T + b + s * drop(x) @ ((B@A)*M).T
            base = nn.functional.linear(x, self._masked_base_weight(), bias)
            zero = ops.zero_weight(self.out_features, self.in_features, weight)
            delta = ops._sparse_lora_linear(self.lora_dropout(x), zero, self.mask, A, B, self.scaling, None,
                                            self.backend)
            return base + delta
        return ops._sparse_lora_linear(x, weight, self.mask, A, B, self.scaling, bias, self.backend)

    # ------------------------------------------------------------------------------------------ merge
    def get_delta_weight(self) -> torch.Tensor:
        """The update the merge adds, ``[out, in]`` in the weight's dtype: ``s*(B@A)*M`` (sparselora,
        lora-remask) or ``s*(B@A)`` (lora)."""
        weight = self.base_layer.weight
        delta = (self.lora_B.weight @ self.lora_A.weight).mul(self.scaling).to(weight.dtype)
        if self.method == "lora":
            return delta
        return delta.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight :meth:`merge` writes: ``W*M + s*(B@A)*M`` computed exactly as the unmerged forward does
        (so merged and unmerged outputs agree bit for bit on the reference backend); ``W + s*B@A`` for
        ``lora``."""
        weight = self.base_layer.weight
        A, B = self.lora_A.weight, self.lora_B.weight
        if self.method == "lora":
            return torch.addmm(self._masked_base_weight(), B.to(weight.dtype), A.to(weight.dtype), alpha=self.scaling)
        return effective_weight_ref(weight, self.mask, A, B, self.scaling)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, keep_original: bool = True) -> None:
        """Write the update into ``base_layer.weight`` (idempotent: merging twice changes nothing).

        ``safe_merge=True`` computes the merged weight first and refuses (``ValueError``) when it holds NaN or
        inf, leaving the module unchanged. ``keep_original=True`` keeps the pre-merge weight so that
        :meth:`unmerge` restores it exactly (one extra weight until unmerge); otherwise unmerge subtracts
        the delta (exact zeros outside the mask, rounding elsewhere).
        """
        if self.merged:
            logger.warning("SparseLoRALinear.merge: already merged; nothing to do")
            return
        new = self.merged_weight()
        if safe_merge and not bool(torch.isfinite(new).all()):
            bad = int((~torch.isfinite(new)).sum())
            raise ValueError(f"SparseLoRALinear.merge(safe_merge=True): the merged weight has {bad} NaN/inf entries")
        self._unmerged_weight = self.base_layer.weight.data if keep_original else None
        self.base_layer.weight.data = new
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the exact pre-merge weight when it was kept, else ``W' - delta``."""
        if not self.merged:
            logger.warning("SparseLoRALinear.unmerge: not merged; nothing to do")
            return
        if self._unmerged_weight is not None:
            self.base_layer.weight.data = self._unmerged_weight
        else:
            if self.keep_dense:
                raise RuntimeError("unmerge of a keep_dense module merged with keep_original=False: the dense "
                                   "weight is gone")
            self.base_layer.weight.data = self.base_layer.weight.data - self.get_delta_weight()
        self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (and the base bias); the module is left as it was."""
        weight = self.base_layer.weight.detach().clone() if self.merged else self.merged_weight()
        base = self.base_layer
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
        return linear

    @torch.no_grad()
    def to_base_linear(self) -> nn.Linear:
        """The wrapped ``nn.Linear`` without the adapter (unmerged first when merged): the inverse of wrapping."""
        if self.merged:
            self.unmerge()
        return self.base_layer


def sparse_lora_modules(model: nn.Module) -> Iterator[tuple[str, SparseLoRALinear]]:
    """``(name, module)`` for every :class:`SparseLoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLoRALinear):
            yield name, module


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
