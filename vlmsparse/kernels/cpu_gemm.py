"""Dense float32 GEMMs on the CPU through oneDNN, where they measure faster than torch's default.

torch runs float32 ``F.linear`` / ``mm`` on the CPU through MKL's sgemm, which on this AMD CPU with AVX-512
reaches about 200 GFLOPS on 2 cores, what AVX2 FMAs give (MKL is known to pick its code by CPU vendor). oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits) picks its code by the CPU's
features. Measured on the 2-core AMD EPYC (Zen 5, AVX-512) of this
project's machine, 2 threads, ``[1024, K] x [N, K]^T`` (GFLOPS, MKL -> oneDNN): 576->1536 185 -> 422,
1536->576 204 -> 459, 576->192 208 -> 453; the Gram ``X^T X`` of ``[1024, 576]``: 205 -> 368. Both are IEEE
float32 with float32 accumulation; only the order of the sums differs (relative differences about 1e-6).

Used for the calibration forwards and input statistics of pruning (:mod:`vlmsparse.pipeline.prune`), which are
float32 GEMMs on the CPU for most of their time. Which one runs (:func:`use_onednn`) is decided once per process:
``$VLMSPARSE_CPU_GEMM`` = ``onednn`` / ``torch`` forces one; unset or ``auto`` times both on one GEMM
(:func:`~vlmsparse.kernels.timing.median_ms`) and takes oneDNN when it is at least :data:`MIN_SPEEDUP` times
faster (so a machine where they are about equal, e.g. MKL on an Intel CPU, keeps torch's default and its results).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .timing import median_ms

__all__ = ["MIN_SPEEDUP", "ENV", "onednn_available", "use_onednn", "linear", "gram_add_", "onednn_linears"]

log = logging.getLogger(__name__)

ENV = "VLMSPARSE_CPU_GEMM"
CHOICES = ("auto", "onednn", "torch")
# oneDNN must beat torch's default by this much before it replaces it: below that the gain is within run-to-run
# noise and not worth results that differ from torch's in the last bits
MIN_SPEEDUP = 1.3

_decided: dict[str, bool] = {}


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op and it runs here."""
    if "available" not in _decided:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok:
            try:
                x, w = torch.ones(2, 3), torch.ones(4, 3)
                ok = bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                      torch.full((2, 4), 3.0)))
            except (RuntimeError, NotImplementedError):
                ok = False
        _decided["available"] = ok
    return _decided["available"]


def use_onednn() -> bool:
    """Whether float32 CPU GEMMs of :func:`linear` / :func:`gram_add_` run on oneDNN (decided once per process,
    see the module docstring). ValueError for an unknown ``$VLMSPARSE_CPU_GEMM``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"${ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "torch":
        return False
    if choice == "onednn":
        if not onednn_available():
            raise ValueError(f"${ENV}=onednn, but this torch has no working oneDNN linear op "
                             "(torch.ops.mkldnn._linear_pointwise); use auto or torch")
        return True
    if "auto" not in _decided:
        faster = False
        if onednn_available():
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(512, 1024, generator=generator)
            w = torch.randn(1024, 1024, generator=generator)
            cpu = torch.device("cpu")
            default = median_ms(lambda: F.linear(x, w), cpu)
            onednn = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), cpu)
            faster = default >= MIN_SPEEDUP * onednn
            log.info("float32 CPU GEMM [512, 1024] x [1024, 1024]^T: torch %.2f ms, oneDNN %.2f ms: using %s",
                     default, onednn, "oneDNN" if faster else "torch's default")
        _decided["auto"] = faster
    return _decided["auto"]


def _applies(*tensors: torch.Tensor) -> bool:
    """float32 CPU tensors, no autograd graph to record (oneDNN's op has no backward here)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _dense_layout(weight: torch.Tensor) -> bool:
    """A weight oneDNN's linear takes at full speed: contiguous, or the transpose of a contiguous tensor. Any other
    strides (a column slice, a strided view) took 3 s instead of 2-3 ms for ``[1024, 576] x [512, 576]^T`` here;
    the strides of ``x`` did not matter."""
    return weight.is_contiguous() or weight.T.is_contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x [..., in]``, ``weight [out, in]``): on oneDNN for float32 CPU tensors
    outside autograd with a dense weight layout when :func:`use_onednn`, else ``F.linear`` itself."""
    if (x.numel() and _applies(x, weight, *(() if bias is None else (bias,))) and _dense_layout(weight)
            and use_onednn()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gram_add_(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gram += x^T x`` in place (``x [n, in]``, ``gram [in, in]``), on oneDNN as :func:`linear`."""
    if x.shape[0] and _applies(gram, x) and use_onednn():
        xt = x.contiguous().T  # x^T x = linear(x^T, x^T); x^T is the weight there: a dense layout (_dense_layout)
        return gram.add_(linear(xt, xt))
    return gram.addmm_(x.T, x)


def _fast_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, module.weight, module.bias)

    return forward


@contextlib.contextmanager
def onednn_linears(model: nn.Module) -> Iterator[int]:
    """Inside the ``with``, every ``nn.Linear`` of ``model`` (the class itself, not subclasses) whose weight is a
    float32 CPU tensor on entry, or a float32 meta tensor (a model whose weights arrive block by block: streamed
    pruning), computes through :func:`linear`; yields how many were swapped (0 when :func:`use_onednn` is False).
    An instance swap of ``forward`` undone on exit; hooks still run, and weights changed inside the ``with`` are
    used as they are (:func:`linear` falls back to ``F.linear`` for a weight moved to another device or dtype)."""
    swapped: list[nn.Linear] = []
    if use_onednn():
        for module in model.modules():
            if (type(module) is nn.Linear and "forward" not in module.__dict__
                    and module.weight.device.type in ("cpu", "meta") and module.weight.dtype == torch.float32):
                module.forward = _fast_forward(module)
                swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
