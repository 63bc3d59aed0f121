"""The goal table of issue 13 from benchmark rows: goal, measured, pass / fail / missing.

Reads every ``*.jsonl`` row file given (or found under the given folders): ``bench_linear.py`` rows
(``bench: "linear"``), ``bench_e2e.py`` rows (``bench: "e2e"``) and ``bench_overhead.py`` rows
(``bench: "overhead"``). Each goal is judged on the worst case of the rows it names (all shapes and dtypes
present); a goal without rows is ``missing``, never passed. Ratios are speedups (dense time / sparse time, >1 is
faster) measured side by side in one run. Run: ``python benchmarks/goals.py ROWS_OR_FOLDER ...``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

GOAL_SHAPES = ("llava7b-qkvo", "llava7b-up", "llava7b-down")  # 4096->4096, 4096->11008, 11008->4096


def read_rows(paths: Iterable[str | Path]) -> list[dict]:
    rows = []
    for path in map(Path, paths):
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _linear(rows, case, providers, tokens):
    return [r for r in rows if r.get("bench") == "linear" and r.get("case") == case and r.get("provider") in providers
            and r.get("tokens") in tokens and r.get("shape") in GOAL_SHAPES and r.get("ms")]


def _ratio_of(rows, provider, over, case, tokens):
    """Worst ``ms(provider) / ms(over)`` over the (shape, dtype, tokens) both were measured at."""
    mine = {(r["shape"], r["dtype"], r["tokens"]): r for r in _linear(rows, case, (provider,), tokens)}
    base = {(r["shape"], r["dtype"], r["tokens"]): r for r in _linear(rows, case, (over,), tokens)}
    keys = sorted(set(mine) & set(base))
    if not keys:
        return None, None
    worst = max(keys, key=lambda k: mine[k]["ms"] / base[k]["ms"])
    return mine[worst]["ms"] / base[worst]["ms"], worst


def _row(goal: str, target: str, measured: str | None, ok: bool | None) -> dict:
    status = "missing" if measured is None else ("pass" if ok else "FAIL")
    return {"goal": goal, "target": target, "measured": measured or "no rows", "status": status}


def goal_table(rows: list[dict]) -> list[dict]:
    table = []
    # 1. decode
    dec = _linear(rows, "fwd", ("triton24",), (1, 16))
    worst = min(dec, key=lambda r: r["speedup"] or 0.0) if dec else None
    table.append(_row("1 decode M in {1,16}: packed 2:4 forward vs dense cuBLAS", ">= 1.5x",
                      f"x{worst['speedup']:.2f} worst ({worst['shape']} {worst['dtype']} M={worst['tokens']})"
                      if worst else None, bool(worst) and worst["speedup"] >= 1.5))
    # 2. prefill: the best compressed path per (shape, dtype, M)
    best = {}
    for r in _linear(rows, "fwd", ("torch24", "triton24"), (2048, 8192)):
        key = (r["shape"], r["dtype"], r["tokens"])
        if r.get("speedup") and r["speedup"] > best.get(key, 0.0):
            best[key] = r["speedup"]
    at = {t: min((v for k, v in best.items() if k[2] == t), default=None) for t in (2048, 8192)}
    measured = None
    if at[2048] is not None or at[8192] is not None:
        measured = ", ".join(f"M={t}: x{v:.2f}" for t, v in at.items() if v is not None) + " (best 2:4 path, worst shape)"
    ok = at[2048] is not None and at[8192] is not None and at[2048] >= 0.97 and at[8192] >= 1.2
    table.append(_row("2 prefill M >= 2048: best 2:4 path vs dense", ">= 0.97x at 2048, >= 1.2x at 8192", measured, ok))
    # 3. host overhead (+ compile / CUDA graphs: the e2e decode runs fullgraph with mode reduce-overhead)
    over = [r for r in rows if r.get("bench") == "overhead" and r.get("device", "").startswith("cuda")
            and r.get("case") in ("sparse_linear_packed24", "sparselora_nograd") and r.get("current_overhead_us")
            is not None]
    decode_ok = [r for r in rows if r.get("bench") == "e2e" and r.get("metric") == "decode_tokens_per_s"
                 and r.get("variant") == "packed24"]
    measured = None
    if over:
        worst = max(over, key=lambda r: r["current_overhead_us"])
        measured = f"{worst['current_overhead_us']:.1f} us ({worst['case']})"
        if decode_ok:
            measured += "; compiled decode (fullgraph, CUDA graphs) " + ("ran" if decode_ok[0]["value"] else "FAILED")
    ok = bool(over) and max(r["current_overhead_us"] for r in over) <= 15 and bool(decode_ok) and bool(
        decode_ok[0]["value"])
    table.append(_row("3 host overhead per call beyond the kernel; compiles fullgraph under CUDA graphs",
                      "<= 15 us, compiled decode runs", measured, ok))
    # 4. SparseLoRA training step (the default backend, dense_gemm)
    vs_full, k1 = _ratio_of(rows, "dense_gemm_lora", "full_ft", "lora_fwd_bwd", (2048, 8192))
    vs_lora, k2 = _ratio_of(rows, "dense_gemm_lora", "dense_lora", "lora_fwd_bwd", (2048, 8192))
    mem = {(r["shape"], r["dtype"], r["tokens"], r["provider"]): r.get("extra_peak_mb")
           for r in _linear(rows, "lora_fwd_bwd", ("dense_gemm_lora", "full_ft"), (2048, 8192))}
    mem_ok = all(v is not None and mem.get((*k[:3], "full_ft")) is not None and v <= mem[(*k[:3], "full_ft")]
                 for k, v in mem.items() if k[3] == "dense_gemm_lora") if mem else False
    measured = None
    if vs_full is not None and vs_lora is not None:
        measured = (f"{vs_full:.2f}x full FT ({k1[0]} {k1[1]} M={k1[2]}), {vs_lora:.2f}x dense LoRA, peak memory "
                    f"{'<=' if mem_ok else '>'} full FT's")
    table.append(_row("4 SparseLoRA step (fwd+bwd of x, A, B), M in {2048, 8192}", "<= 1.15x full FT, <= 1.5x "
                      "dense LoRA, memory <= full FT", measured,
                      vs_full is not None and vs_lora is not None and vs_full <= 1.15 and vs_lora <= 1.5 and mem_ok))
    # 5. end to end
    e2e = [r for r in rows if r.get("bench") == "e2e" and r.get("value")]
    dec = [r for r in e2e if r["metric"] == "decode_tokens_per_s" and r["variant"] in ("packed24", "torch24")]
    train = [r for r in e2e if r["metric"] == "train_step_ms" and r["variant"] == "sparselora"]
    measured = None
    ok = False
    if dec and train:
        best_dec = max(dec, key=lambda r: r["speedup"] or 0.0)
        prefill = [r for r in e2e if r["metric"] == "prefill_ms" and r["variant"] == best_dec["variant"]]
        pre = prefill[0]["speedup"] if prefill else None
        shown = f"x{pre:.2f}" if pre else "missing"
        step = 1.0 / train[0]["speedup"]  # time vs peft LoRA
        measured = (f"decode x{best_dec['speedup']:.2f} ({best_dec['variant']}), prefill {shown}, train step {step:.2f}x peft LoRA "
                    f"({best_dec['model']}, {best_dec['layers']} layers)")
        ok = best_dec["speedup"] >= 1.3 and pre is not None and pre >= 1.0 and step <= 1.2
    table.append(_row("5 end to end 7B-shaped Llama: decode, prefill 2048, SparseLoRA step 8x512",
                      "decode >= 1.3x, prefill >= 1.0x, step <= 1.2x peft LoRA", measured, ok))
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'status':7s} | {'goal':76s} | {'target':50s} | measured"]
    for row in table:
        lines.append(f"{row['status']:7s} | {row['goal']:76s} | {row['target']:50s} | {row['measured']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: goals.py ROWS.jsonl|FOLDER ...")
        return 2
    rows = read_rows(argv)
    env = next((r for r in rows if r.get("bench") in ("linear", "e2e")), {})
    print(f"goals of issue 13 -- device: {env.get('device', '?')}, torch {env.get('torch', '?')}, triton "
          f"{env.get('triton', '?')}, commit {env.get('commit', '?')}, date {env.get('date', '?')}")
    print(format_table(goal_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
