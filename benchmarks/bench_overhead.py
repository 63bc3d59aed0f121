"""Host (Python) overhead per call of the vlmsparse layers vs ``nn.Linear``, this checkout against a baseline
revision, side by side in one run.

Tiny layers (default 16 x 16, M = 1 token, fp32, one thread) make the matmul negligible, so the time per call
is mostly host cost. Cases: ``nn.Linear``; ``SparseLinear`` with dense storage, with packed 2:4 storage (fp32
and, on a CPU with the native kernels, bf16) and with bitmask storage (fp32, native CPU only);
``SparseLoRALinear`` forward without and with autograd, and forward + backward; and their floors (each row names
its ``floor``): on a CPU with the native kernels built, the C++ op itself (``native_*_op``:
``torch.ops.vlmsparse_native``, the same op in both versions) for the native layers; else the functions of the
default backend called directly (``*_kernel``: the reference twins on a CPU; on a GPU the Triton packed matmul
and the dense_gemm functions), each version through its own dispatcher. The overhead of a layer is its time
minus its floor's: what the module, the dispatcher and autograd add beyond the kernel.

Both versions run in child processes (the baseline from ``git archive <rev>`` in a temporary folder, with this
checkout's built native extension copied in: it is a build output, not in git), rounds alternating between them;
each number is the median over rounds of the mean time per call of a round.

Run: ``python benchmarks/bench_overhead.py [--baseline main|none] [--rounds 5] [--device cpu] [--out FILE]``; rows are
appended to ``benchmarks/results/overhead-<machine>.jsonl`` (device, versions, commit, date).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # not ROOT: a child imports the vlmsparse on its PYTHONPATH

from _rows import RESULTS, append_rows, environment, results_machine  # noqa: E402

CASES = ("linear", "sparse_linear_dense", "packed24_kernel", "native_packed24_op", "sparse_linear_packed24",
         "native_packed24_bf16_op", "sparse_linear_packed24_bf16", "native_bitmask_op", "sparse_linear_bitmask",
         "sparselora_kernel", "sparselora_nograd", "sparselora_fwd", "sparselora_kernel_fwd_bwd", "sparselora_fwd_bwd",
         "linear_fwd", "linear_fwd_bwd")
# the cases that need the native CPU kernels (skipped elsewhere)
NATIVE_CASES = ("native_packed24_op", "native_packed24_bf16_op", "sparse_linear_packed24_bf16", "native_bitmask_op",
                "sparse_linear_bitmask")
# each case's floor, the same computation without the layers above the kernel (the first one measured): nn.Linear
# for the dense path, the native C++ op for the native layers, else the backend's own functions called directly
FLOOR = {"sparse_linear_dense": ("linear",), "sparse_linear_packed24": ("native_packed24_op", "packed24_kernel"),
         "sparse_linear_packed24_bf16": ("native_packed24_bf16_op",),
         "sparse_linear_bitmask": ("native_bitmask_op",),
         "sparselora_nograd": ("sparselora_kernel",), "sparselora_fwd": ("sparselora_kernel",),
         "sparselora_fwd_bwd": ("sparselora_kernel_fwd_bwd",)}


def _kernels(device):
    """The functions the layers' default backends run on ``device`` (SparseLoRA forward, backward, packed matmul),
    looked up through either version's dispatcher (``ops._function`` now, ``ops._impl`` before issue 13)."""
    from vlmsparse import ops

    lora = ops.resolve_backend(device, op="sparse_lora")
    packed = ops.resolve_backend(device, op="packed24_matmul")
    if hasattr(ops, "_function"):
        return (ops._function("sparse_lora", lora, "forward"), ops._function("sparse_lora", lora, "backward"),
                ops._function("packed24_matmul", packed, "forward"))
    return (ops._impl(lora, "sparse_lora", "sparse_lora_forward"), ops._impl(lora, "sparse_lora", "sparse_lora_backward"),
            ops._impl(packed, "packed24", "packed24_matmul"))


def _lora_tensors(lora):
    """``(W, M, A, B, scaling)`` of a SparseLoRALinear of either version: peft's per-adapter layout (adapter
    ``"default"``, buffer ``sparsity_mask``) since issue 17, one adapter and buffer ``mask`` before."""
    if hasattr(lora, "sparsity_mask"):
        return (lora.base_layer.weight, lora.sparsity_mask, lora.lora_A["default"].weight.detach(),
                lora.lora_B["default"].weight.detach(), lora.scaling["default"])
    return lora.base_layer.weight, lora.mask, lora.lora_A.weight.detach(), lora.lora_B.weight.detach(), lora.scaling


def measure(features: int, tokens: int, calls: int, device: str) -> dict[str, float]:
    """Microseconds per call of every case (run inside a child, with ``vlmsparse`` from its PYTHONPATH)."""
    import torch
    from torch import nn

    from vlmsparse.kernels import cpu
    from vlmsparse.modules.sparse_linear import SparseLinear
    from vlmsparse.modules.sparse_lora import SparseLoRALinear
    from vlmsparse.sparsity import mask_nm

    torch.manual_seed(0)
    torch.set_num_threads(1)
    linear = nn.Linear(features, features, device=device)
    mask = mask_nm(linear.weight.detach().abs(), 2, 4)
    with torch.no_grad():
        linear.weight.masked_fill_(~mask, 0)
    dense = SparseLinear(linear.weight, linear.bias, backend="dense")
    packed = SparseLinear(linear.weight, linear.bias, backend="packed24")
    base = nn.Linear(features, features, device=device)
    with torch.no_grad():
        base.weight.copy_(linear.weight)
    lora = SparseLoRALinear(base, mask, r=4, init_lora_weights=False)
    x = torch.randn(tokens, features, device=device)
    xg = x.clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fwd_bwd(module):
        module(xg).sum().backward()

    fwd, bwd, packed_fn = _kernels(x.device)
    W, M, A, B, s = _lora_tensors(lora)
    dy = torch.ones(tokens, features, device=device)

    def kernel_fwd_bwd():
        fwd(x, W, M, A, B, s, lora.base_layer.bias)
        bwd(dy, x, W, M, A, B, s, True)

    fns = {
        "packed24_kernel": lambda: packed_fn(x, packed.values, packed.meta, packed.bias),
        "sparselora_kernel": lambda: fwd(x, W, M, A, B, s, lora.base_layer.bias),
        "sparselora_kernel_fwd_bwd": kernel_fwd_bwd,
        "linear": lambda: linear(x),
        "sparse_linear_dense": lambda: dense(x),
        "sparse_linear_packed24": lambda: packed(x),
        "sparselora_nograd": lambda: lora(x),
        "sparselora_fwd": lambda: lora(xg),
        "linear_fwd": lambda: linear(xg),
        "sparselora_fwd_bwd": lambda: fwd_bwd(lora),
        "linear_fwd_bwd": lambda: fwd_bwd(linear),
    }
    if device == "cpu" and cpu.native_available():
        native = torch.ops.vlmsparse_native
        packed_bf16 = SparseLinear(linear.weight.bfloat16(), linear.bias.bfloat16(), backend="packed24")
        bitmask = SparseLinear(linear.weight, linear.bias, backend="bitmask")
        x_bf16 = x.bfloat16()
        fns |= {
            "native_packed24_op": lambda: native.packed24_linear(x, packed.values, packed.meta, packed.bias),
            "native_packed24_bf16_op": lambda: native.packed24_linear(x_bf16, packed_bf16.values, packed_bf16.meta,
                                                                      packed_bf16.bias),
            "sparse_linear_packed24_bf16": lambda: packed_bf16(x_bf16),
            "native_bitmask_op": lambda: native.bitmask_linear(x, bitmask.values, bitmask.bitmask,
                                                               bitmask.row_offsets, bitmask.bias),
            "sparse_linear_bitmask": lambda: bitmask(x),
        }
    else:
        for name in NATIVE_CASES:
            fns.pop(name, None)
    out = {}
    for name in CASES:
        fn = fns.get(name)
        if fn is None:
            continue
        grad = name.endswith(("_fwd", "_fwd_bwd"))
        with torch.set_grad_enabled(grad):
            for _ in range(max(10, calls // 10)):
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
        out[name] = (time.perf_counter() - start) / calls * 1e6
    return out


def _child(src: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--features", str(args.features),
           "--tokens", str(args.tokens), "--calls", str(args.calls), "--device", args.device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"child for {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="vlmsparse-baseline-") as tmp:
        versions = {"current": ROOT}
        if args.baseline != "none":  # "none": this checkout only (e.g. a copy without .git)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "vlmsparse"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            for built in (ROOT / "vlmsparse").glob("_native_cpu*"):  # the build output git does not hold
                shutil.copy2(built, Path(tmp) / "vlmsparse" / built.name)
            versions = {"baseline": Path(tmp), "current": ROOT}
        samples: dict[str, dict[str, list[float]]] = {v: {c: [] for c in CASES} for v in versions}
        for _ in range(args.rounds):
            for version, src in versions.items():  # alternate: both see the same machine state
                times = _child(src, args)
                for case, us in times.items():
                    samples[version][case].append(us)
    base = {**environment(args.device), "bench": "overhead", "device": args.device, "machine": args.machine,
            "features": args.features, "tokens": args.tokens, "rounds": args.rounds, "baseline_rev": args.baseline,
            "baseline_commit": None if args.baseline == "none" else _git("rev-parse", "--short", args.baseline)}
    rows = []
    for case in CASES:
        if not all(samples[version][case] for version in versions):
            continue
        row = dict(base, case=case)
        floor = next((f for f in FLOOR.get(case, ()) if all(samples[v][f] for v in versions)), None)
        if floor is not None:
            row["floor"] = floor
        for version in versions:
            us = statistics.median(samples[version][case])
            row[f"{version}_us"] = round(us, 2)
            if floor is not None:
                row[f"{version}_overhead_us"] = round(us - statistics.median(samples[version][floor]), 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--machine", default=None, help="results file name part (default: cpu-<n>core / GPU name)")
    parser.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(measure(args.features, args.tokens, args.calls, args.device)))
        return 0
    if args.machine is None:
        args.machine = results_machine(args.device, cpu=f"cpu-{os.cpu_count()}core")
    rows = run(args)
    print(f"us per call, {args.features}x{args.features}, M={args.tokens}, {args.device}; overhead = case - its floor "
          f"(same process and round); baseline {args.baseline} ({rows[0]['baseline_commit']}) vs {rows[0]['commit']}")
    print(f"{'case':28s} {'baseline':>10s} {'current':>10s} {'base ovh':>10s} {'cur ovh':>10s}  floor")

    def cell(row, key):
        return f"{row[key]:10.1f}" if row.get(key) is not None else f"{'-':>10s}"

    for row in rows:
        print(f"{row['case']:28s} {cell(row, 'baseline_us')} {cell(row, 'current_us')} "
              f"{cell(row, 'baseline_overhead_us')} {cell(row, 'current_overhead_us')}  {row.get('floor', '')}")
    out = Path(args.out) if args.out else RESULTS / f"overhead-{args.machine}.jsonl"
    append_rows(out, rows)
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
