"""Step time and peak memory of one training step: full finetuning vs peft LoRA vs naive masked LoRA vs
vlmsparse SparseLoRA, measured side by side in one run (rounds interleave the methods).

Cases: a single linear (default 2048 x 5504 at 512 tokens; ``--large``: 4096 x 11008, the LLaMA-7B MLP) and a
tiny LLaVA (``tests/factories.py``, built from a config) with its vision and language linears pruned to 2:4.

Methods (the same layers train in each):

- ``full``:       the weights train, gradients masked (zeros stay zero), AdamW;
- ``peft-lora``:  peft LoRA (dense update), AdamW on A, B;
- ``naive``:      masked LoRA by autograd over a materialised ``(B@A)*M`` (keeps full-size tensors for backward);
- ``sparselora``: :class:`vlmsparse.SparseLoRALinear` (saves only x, A, B; backend ``reference`` on CPU);
- ``sparselora-packed``: the same layer over the packed 2:4 base (``compress(..., backend="packed24")`` then
  ``add_sparse_lora(model, None)``): the frozen weights stay packed, forward and backward through the fused
  ``packed24_lora`` op (the CUDA default ``dense_gemm`` unpacks per call; ``reference`` on CPU).

``model_mb`` is what the prepared model holds (parameters and buffers): the packed base keeps 9/16 of the dense
fp16 bytes (fp32: 17/32) and no bool mask.

Step = forward, loss, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``. Time: median over
rounds after a warm-up step, methods interleaved within each round (fair on a shared machine); CPU runs use
one thread by default (``--threads``). Peak memory: for each method a fresh child process builds the case and
runs two steps; CPU: peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) minus the RSS before the first
step, so it holds gradients, optimizer states and temporaries (and BLAS packing buffers); CUDA:
``torch.cuda.max_memory_allocated`` the same way.

Rows are appended to ``benchmarks/results/train_step-<machine>.csv`` and ``.jsonl`` with device, versions,
git commit and date. Run: ``python benchmarks/bench_train_step.py [--large] [--rounds 3] [--no-save]``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rows import append_rows, environment, model_bytes, results_machine  # noqa: E402

from vlmsparse.masks import MaskSet  # noqa: E402
from vlmsparse.modules.sparse_lora import SparseLoRALinear  # noqa: E402
from vlmsparse.pipeline.lora import add_sparse_lora, lora_parameters, mask_gradients  # noqa: E402
from vlmsparse.sparsity import build_mask  # noqa: E402

METHODS = ("full", "peft-lora", "naive", "sparselora", "sparselora-packed")
logger = logging.getLogger("bench_train_step")


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above a baseline: CUDA allocator stats, or VmHWM / VmRSS of this process on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.base = self._status("VmRSS:")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM:") - self.base


# ---------------------------------------------------------------------------------------------- methods
def _naive_forward(module: SparseLoRALinear, x: torch.Tensor) -> torch.Tensor:
    W, M = module.base_layer.weight, module.sparsity_mask
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    delta = (B @ A) * module.scaling["default"] * M  # materialised; autograd keeps it and its inputs for backward
    return nn.functional.linear(x, W * M + delta.to(W.dtype), module.base_layer.bias)


def prepare(method: str, model: nn.Module, masks: MaskSet, r: int, alpha: float) -> list[torch.Tensor]:
    """Set ``model`` up for ``method`` in place; return the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "full":
        weights = [model.get_submodule(n).weight for n in masks]
        for w in weights:
            w.requires_grad_(True)
        mask_gradients(model, masks)
        return weights
    if method == "peft-lora":
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(masks), init_lora_weights=False)
        model = peft.get_peft_model(model, config)  # replaces modules in place
        return [p for p in model.parameters() if p.requires_grad]
    if method == "sparselora-packed":
        from vlmsparse.pipeline.compress import compress

        compress(model, masks, backend="packed24", progress=False)
        add_sparse_lora(model, None, r=r, lora_alpha=alpha, init_lora_weights=False)
        return lora_parameters(model)
    add_sparse_lora(model, masks, r=r, lora_alpha=alpha, init_lora_weights=False)
    if method == "naive":
        for module in model.modules():
            if isinstance(module, SparseLoRALinear):
                module.forward = lambda x, m=module: _naive_forward(m, x)  # instance attribute, benchmark only
    return lora_parameters(model)


# ---------------------------------------------------------------------------------------------- cases
def linear_case(out_features: int, in_features: int, tokens: int, device, dtype) -> Callable:
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype))
        weight = model[0].weight
        mask = build_mask(weight.detach().abs(), "2:4")
        with torch.no_grad():
            weight.masked_fill_(~mask, 0)
        x = torch.randn(tokens, in_features, device=device, dtype=dtype)
        grad = torch.randn(tokens, out_features, device=device, dtype=dtype)

        def loss_fn(m):
            return (m(x) * grad).sum()

        return model, MaskSet(masks={"0": mask}), loss_fn

    return build


def llava_case(hidden: int, layers: int, batch: int, device, dtype) -> Callable:
    def build():
        from factories import llava_inputs, tiny_llava

        from vlmsparse.models import prunable_linear_names

        model = tiny_llava(0, hidden=hidden, layers=layers).to(device=device, dtype=dtype)
        masks = {}
        with torch.no_grad():
            for name in prunable_linear_names(model, ("vision", "language")):
                weight = model.get_submodule(name).weight
                masks[name] = build_mask(weight.abs(), "2:4")
                weight.masked_fill_(~masks[name], 0)
        inputs = {k: v.to(device) for k, v in llava_inputs(batch=batch, text_len=32).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

        def loss_fn(m):
            return m(**inputs).logits.float().pow(2).mean()

        return model, MaskSet(masks=masks), loss_fn

    return build


# ---------------------------------------------------------------------------------------------- run
def _train_step(setup, sync) -> float:
    model, loss_fn, opt = setup
    sync()
    start = time.perf_counter()
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def _setup(build: Callable, method: str, r: int, alpha: float):
    model, masks, loss_fn = build()
    largest = max(m.numel() * model.get_submodule(n).weight.element_size() for n, m in masks.items())
    params = prepare(method, model, masks, r, alpha)
    setup = (model, loss_fn, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01))
    return setup, largest, model_bytes(model)


def measure_memory(build: Callable, method: str, r: int, alpha: float, device: torch.device) -> int:
    """Peak bytes above the built model during the first two steps (gradients, optimizer states, temporaries)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    setup, _, _ = _setup(build, method, r, alpha)
    meter = PeakMemory(device)
    meter.start()
    for _ in range(2):
        _train_step(setup, sync)
    return meter.peak()


def _memory_in_child(argv: list[str], case: str, method: str) -> int:
    """Run :func:`measure_memory` in a fresh interpreter so allocator state and lazy initialisation are equal
    for every method."""
    cmd = [sys.executable, __file__, *argv, "--_child", f"{case}:{method}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def run_case(name: str, build: Callable, rounds: int, r: int, alpha: float, device: torch.device,
             argv: list[str], key: str) -> list[dict]:
    """Memory per method in a child process; time per method in this one, methods interleaved per round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peaks = {method: _memory_in_child(argv, key, method) for method in METHODS}
    setups, held = {}, {}
    for method in METHODS:
        setups[method], largest, held[method] = _setup(build, method, r, alpha)
        _train_step(setups[method], sync)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method in METHODS:
            times[method].append(_train_step(setups[method], sync))
    rows = []
    for method in METHODS:
        rows.append({
            "case": name,
            "method": method,
            "step_ms_median": round(1e3 * statistics.median(times[method]), 2),
            "step_ms_min": round(1e3 * min(times[method]), 2),
            "rounds": rounds,
            "peak_mem_mb": round(peaks[method] / 2**20, 2),
            "largest_weight_mb": round(largest / 2**20, 2),
            "model_mb": round(held[method] / 2**20, 2),
        })
    full, peft_row = rows[0], rows[1]
    for row in rows:
        row["time_vs_full"] = round(row["step_ms_median"] / full["step_ms_median"], 3)
        row["mem_vs_peft_lora_mb"] = round(row["peak_mem_mb"] - peft_row["peak_mem_mb"], 2)
    return rows


def _machine(device: torch.device) -> str:
    return results_machine(device, cpu=f"cpu-{os.cpu_count()}core")


def _versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def _meta(args: argparse.Namespace, device: torch.device) -> dict:
    env = environment(device)
    # git_commit: the column of the existing train_step CSV files
    return {**env, "device": _machine(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "r": args.r,
            **_versions(), "git_commit": env["commit"], "note": args.note}


def save_rows(rows: list[dict], machine: str, out_dir: Path) -> Path:
    from vlmsparse._io import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"train_step-{machine}.csv", out_dir / f"train_step-{machine}.jsonl"
    existing = csv_path.read_text() if csv_path.exists() else ""
    # an existing CSV keeps its columns (fields it lacks are left out): its rows stay aligned with its header
    fields = next(csv.reader([existing.splitlines()[0]])) if existing else list(rows[0])

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(existing)
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not existing:
                writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write_csv)
    append_rows(json_path, rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="single linear 4096 x 11008 (else 2048 x 5504)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--llava-hidden", type=int, default=256)
    parser.add_argument("--llava-layers", type=int, default=2)
    parser.add_argument("--cases", default="linear,llava", help="comma list of linear, llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine more threads wait on each other)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--note", default="", help="free text stored in every row (e.g. 'shared machine')")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    out, inp = (11008, 4096) if args.large else (5504, 2048)
    cases = {}
    for case in args.cases.split(","):
        if case == "linear":
            cases[case] = (f"linear-{inp}x{out}-T{args.tokens}", linear_case(out, inp, args.tokens, device, dtype))
        elif case == "llava":
            cases[case] = (f"tiny-llava-h{args.llava_hidden}-L{args.llava_layers}",
                           llava_case(args.llava_hidden, args.llava_layers, 4, device, dtype))
        else:
            parser.error(f"unknown case {case!r}; allowed: linear, llava")
    if args._child:
        case, method = args._child.split(":")
        print(measure_memory(cases[case][1], method, args.r, args.alpha, device))
        return 0
    meta = _meta(args, device)
    rows = []
    for key, (name, build) in cases.items():
        logger.info("case %s ...", name)
        start = time.perf_counter()
        for row in run_case(name, build, args.rounds, args.r, args.alpha, device, argv, key):
            rows.append({**meta, **row})
        logger.info("  %.1f s", time.perf_counter() - start)
    header = (f"{'case':34s} {'method':17s} {'step ms':>9s} {'x full':>7s} {'peak MB':>9s} {'-peft MB':>9s} "
              f"{'model MB':>9s}")
    print(header)
    for row in rows:
        print(f"{row['case']:34s} {row['method']:17s} {row['step_ms_median']:9.1f} {row['time_vs_full']:7.3f} "
              f"{row['peak_mem_mb']:9.1f} {row['mem_vs_peft_lora_mb']:9.1f} {row['model_mb']:9.1f}")
    for name, _ in cases.values():
        by = {r["method"]: r for r in rows if r["case"] == name}
        s, naive = by["sparselora"], by["naive"]
        print(f"{name}: sparselora time {s['time_vs_full']:.2f}x full (target <= 1.1), "
              f"{'below' if s['step_ms_median'] < naive['step_ms_median'] else 'NOT below'} naive; "
              f"memory peft + {s['mem_vs_peft_lora_mb']:.1f} MB (target <= {s['largest_weight_mb']:.1f} MB)")
    if not args.no_save:
        path = save_rows(rows, meta["device"], Path(args.out))
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
