"""Time and peak memory of ``prune_model`` per method on a Llama-shaped model built in code (random weights).

Default model: the shape of a 135M-parameter Llama (hidden 576, MLP 1536, 30 blocks, 9 heads / 3 KV heads,
vocab 49152), calibrated on 32 sequences x 128 tokens. Reports, per method: total wall time, the pruning
time (sum over layers of the per-layer algorithm time: masks, Hessian inverse, OBS updates) and the rest
(calibration forwards through the blocks, input statistics incl. X^T X), and the peak memory.
Rows are appended to ``benchmarks/results/prune-<device>.jsonl`` with the device, versions, git commit, date.

    python benchmarks/bench_prune.py                       # all methods, the 135M shape
    python benchmarks/bench_prune.py --layers 4 --methods wanda   # a quick run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} cpu x{torch.get_num_threads()} threads"


def build_model(layers: int, hidden: int, intermediate: int, vocab: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=9 if hidden % 9 == 0 else 8, num_key_value_heads=3 if hidden % 9 == 0 else 4,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--report-error", action="store_true", help="Wanda/magnitude: also accumulate X^T X")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--note", default="", help="free text stored with the rows (e.g. 'shared machine')")
    args = parser.parse_args(argv)

    from vlmsparse.pipeline.prune import prune_model, report_of

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.samples, args.seqlen), generator=g)
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
               for chunk in ids.split(args.batch_size)]
    device_name = _device_name(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")[:60]
    out_file = out_dir / f"prune-{slug}.jsonl"
    rows = []
    for method in args.methods.split(","):
        model = build_model(args.layers, args.hidden, args.intermediate, args.vocab, dtype, args.device)
        params = sum(p.numel() for p in model.parameters())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        masks = prune_model(model, method=method, sparsity=args.sparsity, calibration=batches, progress=False,
                            report_error=args.report_error or method == "sparsegpt")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        prune_s = sum(r.seconds for r in report_of(masks))
        peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        row = {
            "bench": "prune",
            "method": method,
            "sparsity": args.sparsity,
            "params": params,
            "layers": args.layers,
            "hidden": args.hidden,
            "tokens": f"{args.samples}x{args.seqlen}",
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "report_error": bool(args.report_error or method == "sparsegpt"),
            "total_s": round(total, 3),
            "prune_s": round(prune_s, 3),
            "calibration_s": round(total - prune_s, 3),
            "peak_memory_mib": round(peak / 2**20, 1),
            "peak_memory_kind": "cuda max allocated" if args.device.startswith("cuda") else "process max RSS",
            "sparsity_achieved": round(masks.sparsity(), 6),
            "device": device_name,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": args.note,
        }
        rows.append(row)
        print(f"{method:>10}: total {total:7.2f} s  prune {prune_s:7.2f} s  calibration {total - prune_s:7.2f} s  "
              f"peak {row['peak_memory_mib']:.0f} MiB  sparsity {row['sparsity_achieved']:.4f}", flush=True)
        del model, masks
    with open(out_file, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"appended {len(rows)} rows to {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
