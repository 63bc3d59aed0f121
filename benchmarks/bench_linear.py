"""Benchmark one linear layer: dense cuBLAS vs torch semi-structured vs the vlmsparse Triton kernels.

Cases (``--cases``):

- ``fwd``: inference ``y = x @ W.T + b`` with a 2:4 ``W``: providers ``dense`` (F.linear), ``torch24``
  (torch semi-structured), ``cslt`` (``torch._cslt_sparse_mm`` called directly, no tensor subclass, with the
  algorithm that ``torch._cslt_sparse_mm_search`` picks for this M on the first call; x padded to cuSPARSELt's
  multiple of 8 rows in each call; issue 13 asks whether this is what makes the ``torch24`` rows slow),
  ``triton24`` (packed 2:4 Triton kernel), ``reference`` (unpack + F.linear).
- ``lora_fwd``: SparseLoRA forward ``y = x @ (W*M + s*(B@A)*M).T``: ``dense`` (plain F.linear, the floor),
  ``triton24_lora`` (packed 2:4 + fused adapter), ``triton_lora`` (dense-stored W + bool mask, fused),
  ``reference`` (materialised effective weight).
- ``lora_fwd_bwd``: forward + backward (grads of x, A, B) through ``vlmsparse.ops`` autograd:
  ``dense`` (F.linear fwd+bwd w.r.t. x), ``full_ft`` (F.linear fwd+bwd w.r.t. x and W: full finetuning of the
  layer), ``dense_lora`` (plain LoRA ``x W^T + s (x A^T) B^T``, grads of x, A, B), ``dense_gemm_lora`` (the
  default SparseLoRA backend on CUDA), ``triton24_lora``, ``triton_lora``, ``reference``; the peak memory
  of one step is recorded.

Shapes (in, out): LLaVA-1.5-7B 4096x4096, 4096x11008, 11008x4096; CLIP ViT-L 1024x1024, 1024x4096, 4096x1024.
Tokens M in {1, 16, 128, 576, 2048, 8192}; fp16 and bf16. Times are medians of ``triton.testing.do_bench`` on
random data after warm-up, rotating through copies of the weights larger than L2. One row per
(case, provider, shape, tokens, dtype) is appended to ``--out`` (default ``benchmarks/results/<machine>.jsonl``)
with the device, versions, git commit and date; ``speedup`` is dense time / provider time in the same run.

On a machine without CUDA it times the reference path on a few small cases with ``time.perf_counter`` and says
that the GPU rows are missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rows import RESULTS, append_rows, environment, results_machine  # noqa: E402

from vlmsparse.kernels.timing import median_ms  # noqa: E402

SHAPES = {
    "llava7b-qkvo": (4096, 4096),
    "llava7b-up": (4096, 11008),
    "llava7b-down": (11008, 4096),
    "clipL-attn": (1024, 1024),
    "clipL-fc1": (1024, 4096),
    "clipL-fc2": (4096, 1024),
}
TOKENS = (1, 16, 128, 576, 2048, 8192)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CASES = {
    "fwd": ("dense", "torch24", "cslt", "triton24", "reference"),
    "lora_fwd": ("dense", "triton24_lora", "triton_lora", "reference"),
    "lora_fwd_bwd": ("dense", "full_ft", "dense_lora", "dense_gemm_lora", "triton24_lora", "triton_lora", "reference"),
}
RANK, SCALING = 16, 2.0
L2_ROTATE_BYTES = 256 << 20  # weight copies cycled so that one pass exceeds any L2


def _cslt_compressed(weight: torch.Tensor) -> torch.Tensor | None:
    """cuSPARSELt's compressed form of a 2:4 weight (``torch._cslt_compress``), None where it cannot take it."""
    from vlmsparse.sparse24 import semi_structured_support

    if not (weight.is_cuda and torch.backends.cusparselt.is_available()
            and semi_structured_support(weight, backend="cusparselt")[0]):
        return None
    return torch._cslt_compress(weight.contiguous())


def _cslt_linear(x: torch.Tensor, layers: list, pick):
    """``y = x @ W.T + b`` through ``torch._cslt_sparse_mm`` on the copies' compressed weights. The first call
    searches the algorithm for this M (``torch._cslt_sparse_mm_search``, untimed: the benchmark's warm-up) and
    checks the result against ``F.linear`` (relative error of the output at most 1e-2), so a wrong result is an
    error row, not a fast one."""
    rows = x.shape[0]
    pad = (-rows) % 8  # cuSPARSELt's dense operand (x^T here) takes a multiple of 8 columns in fp16 / bf16
    state = {"alg": None}

    def padded() -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x

    def run():
        lay = pick()
        if state["alg"] is None:
            state["alg"] = int(torch._cslt_sparse_mm_search(lay["cslt"], padded().t(), lay["bias"],
                                                             transpose_result=True))
            y = torch._cslt_sparse_mm(lay["cslt"], padded().t(), lay["bias"], transpose_result=True,
                                      alg_id=state["alg"])[:rows]
            expected = torch.nn.functional.linear(x, lay["weight"], lay["bias"]).float()
            error = float((y.float() - expected).norm() / expected.norm())
            if error > 1e-2:
                raise RuntimeError(f"torch._cslt_sparse_mm differs from F.linear: relative error {error:.3g}")
            return y
        y = torch._cslt_sparse_mm(lay["cslt"], padded().t(), lay["bias"], transpose_result=True, alg_id=state["alg"])
        return y[:rows] if pad else y

    return run


def _layer(n_in: int, n_out: int, dtype: torch.dtype, device: str, copies: int):
    """``copies`` independent 2:4 layers (weight, packed, mask, A, B, bias, semi-structured or None, cuSPARSELt
    compressed or None)."""
    from vlmsparse.sparse24 import pack24, semi_structured_support, to_semi_structured
    from vlmsparse.sparsity import mask_nm

    layers = []
    for i in range(copies):
        g = torch.Generator(device=device).manual_seed(i)
        dense = torch.randn(n_out, n_in, generator=g, device=device, dtype=dtype)
        mask = mask_nm(dense.abs(), 2, 4)
        weight = torch.where(mask, dense, torch.zeros((), dtype=dtype, device=device))
        del dense
        semi = to_semi_structured(weight) if semi_structured_support(weight)[0] else None
        layers.append(dict(
            weight=weight, packed=pack24(weight), mask=mask, semi=semi, cslt=_cslt_compressed(weight),
            A=0.01 * torch.randn(RANK, n_in, device=device, dtype=dtype),
            B=0.01 * torch.randn(n_out, RANK, device=device, dtype=dtype),
            bias=torch.randn(n_out, device=device, dtype=dtype),
        ))
    return layers


def _make_fn(case: str, provider: str, layers: list, x: torch.Tensor, dy: torch.Tensor):
    """A zero-argument callable running one step, cycling through the weight copies; None if unavailable."""
    from vlmsparse import ops
    from vlmsparse.kernels import reference as ref

    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % len(layers)
        return layers[state["i"]]

    cuda = x.is_cuda
    triton_ok = cuda or os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs them on CPU (tests)
    if case == "fwd":
        if provider == "dense":
            return lambda: torch.nn.functional.linear(x, (lay := pick())["weight"], lay["bias"])
        if provider == "torch24":
            if layers[0]["semi"] is None:
                return None
            return lambda: ops.torch24_linear(x, (lay := pick())["semi"], lay["bias"])
        if provider == "cslt":
            if layers[0]["cslt"] is None:
                return None
            return _cslt_linear(x, layers, pick)
        if provider == "triton24":
            if not triton_ok:
                return None
            from vlmsparse.kernels.packed24 import packed24_matmul

            return lambda: packed24_matmul(x, (lay := pick())["packed"].values, lay["packed"].meta, lay["bias"])
        if provider == "reference":
            return lambda: ref.packed24_matmul_ref(x, (lay := pick())["packed"].values, lay["packed"].meta, lay["bias"])
    if case == "lora_fwd":
        if provider == "dense":
            return lambda: torch.nn.functional.linear(x, (lay := pick())["weight"], lay["bias"])
        if provider == "triton24_lora":
            if not triton_ok:
                return None
            from vlmsparse.kernels.packed24 import packed24_lora_forward

            def run():
                lay = pick()
                return packed24_lora_forward(x, lay["packed"].values, lay["packed"].meta, lay["A"], lay["B"], SCALING, lay["bias"])

            return run
        if provider == "triton_lora":
            if not triton_ok:
                return None
            from vlmsparse.kernels.sparse_lora import sparse_lora_forward

            return lambda: sparse_lora_forward(x, (lay := pick())["weight"], lay["mask"], lay["A"], lay["B"], SCALING, lay["bias"])
        if provider == "reference":
            return lambda: ref.sparse_lora_forward_ref(x, (lay := pick())["weight"], lay["mask"], lay["A"], lay["B"], SCALING,
                                                       lay["bias"])
    if case == "lora_fwd_bwd":
        xg = x.detach().clone().requires_grad_(True)
        if provider == "dense":
            def run():
                lay = pick()
                w = lay["weight"].requires_grad_(False)
                torch.nn.functional.linear(xg, w, lay["bias"]).backward(dy)
                xg.grad = None
            return run
        if provider == "full_ft":
            def run():
                lay = pick()
                w = lay["weight"].requires_grad_(True)
                torch.nn.functional.linear(xg, w, lay["bias"]).backward(dy)
                w.requires_grad_(False)
                xg.grad = w.grad = None
            return run
        if provider == "dense_lora":
            def run():
                lay = pick()
                A = lay["A"].requires_grad_(True)
                B = lay["B"].requires_grad_(True)
                y = torch.nn.functional.linear(xg, lay["weight"], lay["bias"])
                (y + SCALING * torch.nn.functional.linear(torch.nn.functional.linear(xg, A), B)).backward(dy)
                A.grad = B.grad = xg.grad = None
            return run
        backend = {"triton24_lora": "triton", "triton_lora": "triton", "reference": "reference",
                   "dense_gemm_lora": "dense_gemm"}[provider]
        if backend == "triton" and not triton_ok:
            return None
        packed = provider == "triton24_lora"

        def run():
            lay = pick()
            A = lay["A"].requires_grad_(True)
            B = lay["B"].requires_grad_(True)
            if packed:
                y = ops.packed24_lora_linear(xg, lay["packed"].values, lay["packed"].meta, A, B, SCALING, lay["bias"],
                                             backend=backend)
            else:
                y = ops.sparse_lora_linear(xg, lay["weight"], lay["mask"], A, B, SCALING, lay["bias"], backend=backend)
            y.backward(dy)
            A.grad = B.grad = xg.grad = None
        return run
    raise ValueError(f"unknown case/provider {case}/{provider}")


def _shape(name: str) -> tuple[int, int]:
    """A named shape or ``IN:OUT``."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        n_in, n_out = (int(v) for v in name.split(":"))
    except ValueError:
        raise SystemExit(f"unknown shape {name!r}: one of {', '.join(SHAPES)} or IN:OUT") from None
    if n_in % 4 or n_in <= 0 or n_out <= 0:
        raise SystemExit(f"shape {name!r}: IN must be a positive multiple of 4 (2:4 groups)")
    return n_in, n_out


def run(args: argparse.Namespace) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = environment(device)
    rows = []
    start = time.monotonic()
    skipped = 0
    shapes = {name: _shape(name) for name in args.shapes}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for shape_name, (n_in, n_out) in shapes.items():
            weight_bytes = n_in * n_out * torch.empty(0, dtype=dtype).element_size()
            copies = max(1, min(16, -(-L2_ROTATE_BYTES // weight_bytes))) if cuda else 1
            layers = _layer(n_in, n_out, dtype, device, copies)
            for tokens in args.tokens:
                if args.time_budget and time.monotonic() - start > args.time_budget:
                    skipped += 1
                    continue
                x = torch.randn(tokens, n_in, device=device, dtype=dtype)
                dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
                for case in args.cases:
                    dense_ms = None
                    for provider in CASES[case]:
                        if args.providers and provider not in args.providers and provider != "dense":
                            continue
                        fn = _make_fn(case, provider, layers, x, dy)
                        if fn is None:
                            continue
                        try:
                            if cuda:
                                fn()
                                torch.cuda.synchronize()
                                torch.cuda.reset_peak_memory_stats()
                                base = torch.cuda.memory_allocated()
                                fn()
                                torch.cuda.synchronize()
                                peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
                            else:
                                peak_mb = None
                            ms = median_ms(fn, torch.device("cuda" if cuda else "cpu"), repeats=3)
                            error = None
                        except Exception as exc:  # a provider failing must not stop the others
                            ms, peak_mb, error = None, None, f"{type(exc).__name__}: {exc}"[:300]
                        if provider == "dense":
                            dense_ms = ms
                        row = {
                            "bench": "linear", "case": case, "provider": provider, "shape": shape_name,
                            "in": n_in, "out": n_out, "tokens": tokens, "dtype": dtype_name, "ms": ms,
                            "speedup": (dense_ms / ms) if (ms and dense_ms) else None,
                            "extra_peak_mb": peak_mb, "error": error, **env,
                        }
                        rows.append(row)
                        shown = f"{ms:9.4f} ms" if ms is not None else f"FAILED {error}"
                        speed = f"  x{row['speedup']:.2f}" if row["speedup"] else ""
                        print(f"{case:13s} {provider:14s} {shape_name:13s} M={tokens:5d} {dtype_name}: {shown}{speed}",
                              flush=True)
            del layers
            if cuda:
                torch.cuda.empty_cache()
    if skipped:
        print(f"time budget of {args.time_budget:.0f} s spent: {skipped} (shape, dtype, tokens) combinations "
              "were not run; rerun them with --shapes / --tokens / --dtypes")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, help=f"names ({', '.join(SHAPES)}) or IN:OUT")
    parser.add_argument("--tokens", nargs="+", type=int, default=None, help=f"default: {TOKENS}")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES), help="default: fp16 bf16")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--providers", nargs="+", default=None, help="only these (dense is always run)")
    parser.add_argument("--quick", action="store_true", help="a few shapes and token counts")
    parser.add_argument("--machine", default=None, help="results file name (default: the GPU name or 'cpu')")
    parser.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds after which no new (shape, tokens) combination is started (0: no limit)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("No CUDA device: timing the reference path on small cases only; the GPU rows "
              "(dense cuBLAS, torch semi-structured, Triton) are missing. Run benchmarks/run_gpu.sh on a GPU.")
        defaults = (["clipL-attn"], [1, 16], ["fp32"])
    elif args.quick:  # the goal shapes and token counts of issue 13
        defaults = (["llava7b-qkvo", "llava7b-up", "llava7b-down"], [1, 16, 2048, 8192], ["fp16", "bf16"])
    else:
        defaults = (list(SHAPES), list(TOKENS), ["fp16", "bf16"])
    args.shapes = args.shapes or defaults[0]
    args.tokens = args.tokens or defaults[1]
    args.dtypes = args.dtypes or defaults[2]
    machine = args.machine or results_machine("cuda" if cuda else "cpu")
    out = Path(args.out) if args.out else RESULTS / f"{machine}.jsonl"
    rows = run(args)
    append_rows(out, rows)
    print(f"{len(rows)} rows appended to {out}")
    return 0 if all(r["error"] is None for r in rows) or os.environ.get("BENCH_ALLOW_ERRORS") else 1


if __name__ == "__main__":
    sys.exit(main())
