"""Sparse linears on a CPU: the native kernels (vlmsparse.kernels.cpu) against torch's dense F.linear.

Layer rows (``--layers``): for each shape (in -> out) in {4096->11008, 11008->4096, 4096->4096}, dtype in {fp32,
bf16}, thread count in {1, all}, tokens M in {1, 16}: the time of dense F.linear in fp32 and in bf16 (the faster
of the two is the baseline, whatever the sparse weight's dtype), and of the native kernel for the weight in the
same dtype as packed 2:4, bitmask at 50% and at 70% sparsity. ``speedup`` = faster dense / sparse, measured side
by side in one run; ``limit`` = the byte limit at M = 1 (dense bytes of the baseline / sparse bytes);
``gbps`` = weight bytes read per second. ``--isas TIER ...`` times the sparse layer on each of those native tiers in
turn beside the same dense timings (a row per tier, ``isa`` says which; e.g. ``--isas amx avx512bf16`` shows what
the AMX tier adds); the goal table counts the tier in use.

End-to-end row (``--e2e``): a Llama built from a config (TinyLlama widths: hidden 2048, intermediate 5632, 32
heads, 4 KV heads; 8 layers, vocab 4096; random weights), every decoder linear pruned 2:4 by magnitude. Greedy
decoding of ``--new-tokens`` tokens with the pruned weights stored dense (``F.linear``) vs the same model after
``vlmsparse.compress`` (packed 2:4 through the native kernels); the two must produce the same tokens.
``--e2e-model FOLDER`` runs it on a local checkpoint instead (a Llama-architecture causal LM, e.g. SmolLM2-135M
converted by ``bench_prune.py --model X.gguf`` or a ``vlmsparse prune --sparsity 2:4`` output): decoder linears that
are not 2:4 yet are pruned 2:4 by magnitude, and the prompt is ``E2E_PROMPT`` through the folder's tokenizer.

Prefill rows (``--prefill``): for 4096->11008 (``--prefill-shape``), packed 2:4 and 70% bitmask, fp32 and bf16,
rows of x M in ``--prefill-tokens``: the row kernels (``*_linear``), the dense-GEMM path (``*_linear_dense``: the
weight expanded block by block into one reused buffer, one addmm per block) and the former dense path (the whole
weight expanded into a fresh allocation, then ``F.linear``). ``crossover`` (printed) is the smallest M from which
the dense-GEMM path is faster at every larger measured M: what ``DENSE_FROM_ROWS`` in vlmsparse/kernels/cpu.py is
set from.

AVX2 emulation (``--emulate-avx2``): on a CPU with AVX-512 the run re-executes itself with the native kernels forced
to their AVX2 tier and torch's dense baseline restricted to AVX2 (``AVX2_ENV``: ATen's kernels, oneDNN and MKL; set
before torch is imported, checked with ``torch.backends.cpu.get_cpu_capability()``), so the ratios are those of an
AVX2 + FMA machine (AMD Zen 3). Its rows carry ``dense_isa`` and a ``note`` with the load.

Times are medians over repeats after a warm-up (``time.perf_counter``, or the thread's CPU time with ``--clock
cpu`` and one thread: for a shared machine); each call reads the next of several
copies of its weight, at least ``ROTATE_BYTES`` in all, so no weight is served from the last-level cache. Rows are appended to ``--out`` (default ``benchmarks/results/cpu-<machine>.jsonl``) with the
machine, versions, git commit and date; the goal table of issue 14 is printed last.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rows import RESULTS, append_rows, environment  # noqa: E402

SHAPES = {"4096->11008": (4096, 11008), "11008->4096": (11008, 4096), "4096->4096": (4096, 4096)}
QUICK_SHAPES = {"512->1024": (512, 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("packed24", "bitmask50", "bitmask70")
ROTATE_BYTES = 512 << 20
# The environment of --emulate-avx2: the native AVX2 tier; torch's own kernels (ATen), oneDNN (bf16 matmuls) and
# MKL (fp32 GEMMs) limited to AVX2 + FMA.
AVX2_ENV = {"VLMSPARSE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
GOALS = {  # format -> (tokens, minimum speedup over the faster dense) from issue 14
    ("packed24", 1): 1.5,
    ("bitmask70", 1): 2.0,
    ("packed24", 16): 1.0,
    ("bitmask70", 16): 1.0,
}


# The clock of the layer and prefill rows: wall time, or with --clock cpu the calling thread's CPU time
# (time.thread_time; only with --threads 1, where torch and the native kernels run in the calling thread): on a
# machine that other processes share, time spent waiting for a core then does not count.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["wall"]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append((_clock() - start) * 1e3)
    return statistics.median(times)


class _Rotating:
    """Calls ``fn(x, copy)`` over ``copies`` in turn."""

    def __init__(self, fn, x: torch.Tensor, copies: list) -> None:
        self.fn, self.x, self.copies, self.i = fn, x, copies, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(self.x, self.copies[self.i])


def _copies(make, nbytes: int, rotate_bytes: int) -> list:
    """At least ``rotate_bytes`` of copies (``make()`` each, ``nbytes`` a copy); one copy at the least."""
    return [make() for _ in range(max(1, -(-rotate_bytes // max(nbytes, 1))))]


def _sparse_weight(in_features: int, out_features: int, fmt: str, generator: torch.Generator) -> torch.Tensor:
    from vlmsparse.sparsity import mask_nm

    weight = torch.randn(out_features, in_features, generator=generator)
    if fmt == "packed24":
        keep = mask_nm(weight.abs(), 2, 4)
    else:
        keep = torch.rand(out_features, in_features, generator=generator) >= int(fmt[len("bitmask"):]) / 100
    return torch.where(keep, weight, 0.0)


def bench_layers(shapes: dict, tokens: tuple[int, ...], threads: list[int], repeats: int, env: dict,
                 tiers: tuple[str, ...] = (), rotate_bytes: int = ROTATE_BYTES) -> list[dict]:
    """Layer rows: each sparse format and dtype against dense fp32 and bf16 ``F.linear``, each call on the next of
    copies of the weight that hold ``rotate_bytes`` in all. With ``tiers``, the sparse layer is timed on each of
    those native tiers in turn beside the same dense timings (one row per tier); otherwise on the tier in use."""
    from vlmsparse.kernels import cpu
    from vlmsparse.modules.sparse_linear import SparseLinear

    in_use = cpu.isa()
    tiers = tiers or (in_use,)

    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape_name, (in_features, out_features) in shapes.items():
        for fmt in FORMATS:
            master = _sparse_weight(in_features, out_features, fmt, generator)
            for dtype_name, dtype in DTYPES.items():
                weight = master.to(dtype)
                backend = "packed24" if fmt == "packed24" else "bitmask"
                sparse = SparseLinear(weight, backend=backend)
                sparse_copies = _copies(lambda w=weight, b=backend: SparseLinear(w, backend=b), sparse.weight_bytes(),
                                        rotate_bytes)
                dense = {name: master.to(d) for name, d in DTYPES.items()}
                dense_copies = {name: _copies(w.clone, w.numel() * w.element_size(), rotate_bytes)
                                for name, w in dense.items()}
                for n_threads in threads:
                    torch.set_num_threads(n_threads)
                    for m in tokens:
                        x = torch.randn(m, in_features, generator=generator)
                        dense_ms = {name: _median_ms(_Rotating(torch.nn.functional.linear, x.to(dense[name].dtype),
                                                               dense_copies[name]), repeats)
                                    for name in dense}
                        best = min(dense_ms, key=dense_ms.get)
                        dense_bytes = dense[best].numel() * dense[best].element_size()
                        for tier in tiers:
                            cpu.set_isa(tier)
                            try:
                                sparse_ms = _median_ms(_Rotating(lambda xs, layer: layer(xs), x.to(dtype),
                                                                 sparse_copies), repeats)
                            finally:
                                cpu.set_isa(in_use)
                            rows.append({
                                "bench": "cpu_layer", "shape": shape_name, "in": in_features, "out": out_features,
                                "format": fmt, "dtype": dtype_name, "threads": n_threads, "tokens": m,
                                "dense_fp32_ms": round(dense_ms["fp32"], 4),
                                "dense_bf16_ms": round(dense_ms["bf16"], 4),
                                "baseline": f"dense {best}", "sparse_ms": round(sparse_ms, 4),
                                "speedup": round(dense_ms[best] / sparse_ms, 3),
                                "dense_bytes": dense_bytes, "sparse_bytes": sparse.weight_bytes(),
                                "limit": round(dense_bytes / sparse.weight_bytes(), 3),
                                "gbps": round(sparse.weight_bytes() / sparse_ms / 1e6, 2),
                                "dense_gbps": round(dense_bytes / dense_ms[best] / 1e6, 2),
                                "load": [round(v, 2) for v in os.getloadavg()], **env, "isa": tier,
                            })
                            print(_layer_line(rows[-1]), flush=True)
    return rows


def _layer_line(row: dict) -> str:
    return (f"{row['shape']:12s} {row['format']:9s} {row['dtype']} {row['isa']} t={row['threads']} "
            f"M={row['tokens']:<3d} "
            f"dense fp32 {row['dense_fp32_ms']:8.3f} bf16 {row['dense_bf16_ms']:8.3f} ms | sparse "
            f"{row['sparse_ms']:8.3f} ms = {row['speedup']:.2f}x (byte limit {row['limit']:.2f}x; "
            f"{row['gbps']:.1f} GB/s vs dense {row['dense_gbps']:.1f})")


def bench_prefill(shape: tuple[int, int], tokens: tuple[int, ...], threads: list[int], repeats: int,
                  env: dict) -> list[dict]:
    """Row kernels vs the dense-GEMM path vs the former full expansion, per format, dtype, thread count and M."""
    from vlmsparse.bitmask import pack_bitmask_weight
    from vlmsparse.sparse24 import pack24

    ops = torch.ops.vlmsparse_native
    in_features, out_features = shape
    rows = []
    generator = torch.Generator().manual_seed(0)
    for fmt in ("packed24", "bitmask70"):
        master = _sparse_weight(in_features, out_features, fmt, generator)
        for dtype_name, dtype in DTYPES.items():
            weight = master.to(dtype)
            if fmt == "packed24":
                packed = pack24(weight)
                args = (packed.values, packed.meta)
                paths = {"rows": lambda x, a=args: ops.packed24_linear(x, *a, None),
                         "dense_blocks": lambda x, a=args: ops.packed24_linear_dense(x, *a, None),
                         "dense_full": lambda x, a=args: torch.nn.functional.linear(x, ops.packed24_to_dense(*a))}
            else:
                packed = pack_bitmask_weight(weight)
                args = (packed.values, packed.bitmask, packed.row_offsets)
                paths = {"rows": lambda x, a=args: ops.bitmask_linear(x, *a, None),
                         "dense_blocks": lambda x, a=args: ops.bitmask_linear_dense(x, *a, None),
                         "dense_full": lambda x, a=args: torch.nn.functional.linear(
                             x, ops.bitmask_to_dense(*a, in_features))}
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                measured = []
                for m in tokens:
                    x = torch.randn(m, in_features, generator=generator).to(dtype)
                    ms = {name: _median_ms(lambda f=fn, xs=x: f(xs), repeats) for name, fn in paths.items()}
                    rows.append({"bench": "cpu_prefill", "shape": f"{in_features}->{out_features}", "in": in_features,
                                 "out": out_features, "format": fmt, "dtype": dtype_name, "threads": n_threads,
                                 "tokens": m, **{f"{name}_ms": round(t, 3) for name, t in ms.items()},
                                 "load": [round(v, 2) for v in os.getloadavg()], **env})
                    measured.append((m, ms["rows"], ms["dense_blocks"]))
                    print(f"prefill {fmt:9s} {dtype_name} t={n_threads} M={m:<4d} rows {ms['rows']:9.2f} ms | dense "
                          f"blocks {ms['dense_blocks']:9.2f} ms | dense full copy {ms['dense_full']:9.2f} ms",
                          flush=True)
                print(f"crossover {fmt} {dtype_name} t={n_threads}: dense GEMM path from M = "
                      f"{crossover(measured)}", flush=True)
    return rows


def crossover(measured: list[tuple[int, float, float]]) -> int | None:
    """Smallest M from which ``dense_ms < rows_ms`` at every larger measured M (``(M, rows_ms, dense_ms)``);
    None when the dense path never wins at the largest M."""
    found = None
    for m, rows_ms, dense_ms in sorted(measured, reverse=True):
        if dense_ms >= rows_ms:
            break
        found = m
    return found


def _prune_decoder_24(model) -> int:
    """Magnitude 2:4 on every decoder linear (``.layers.`` in its name) that is not 2:4 already; returns how many
    were pruned."""
    from vlmsparse.sparsity import mask_nm, satisfies_nm

    pruned = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and not satisfies_nm(module.weight, 2, 4):
                weight = module.weight
                weight.copy_(torch.where(mask_nm(weight.abs().float(), 2, 4), weight, 0.0))
                pruned += 1
    return pruned


def _e2e_model(layers: int, hidden: int, intermediate: int, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 512, 1), max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    _prune_decoder_24(model)
    return model


E2E_PROMPT = "Python is a programming language that lets you work quickly and integrate systems more effectively. It"


def _e2e_inputs(model_folder: str | None, dtype: torch.dtype, prompt: int, quick: bool):
    """``(2:4-pruned model stored dense, prompt ids [1, P], row label)``: the Llama built in code with ``prompt``
    random tokens, or the checkpoint in ``model_folder`` with ``E2E_PROMPT``."""
    if model_folder is None:
        dims = (2, 64, 128, 256) if quick else (8, 2048, 5632, 4096)
        ids = torch.randint(3, dims[3], (1, prompt), generator=torch.Generator().manual_seed(1))
        return _e2e_model(*dims, dtype), ids, "llama {}L h{} i{} v{} (random weights, 2:4)".format(*dims)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).eval()
    pruned = _prune_decoder_24(model)
    ids = AutoTokenizer.from_pretrained(model_folder)(E2E_PROMPT, return_tensors="pt").input_ids
    how = f"{pruned} decoder linears 2:4 by magnitude" if pruned else "its own 2:4 weights"
    return model, ids, f"{Path(model_folder).name} ({how})"


@torch.no_grad()
def bench_e2e(dtype_name: str, threads: int, new_tokens: int, prompt: int, quick: bool, env: dict,
              model_folder: str | None = None) -> dict:
    import copy

    from vlmsparse.pipeline.compress import compress

    torch.set_num_threads(threads)
    dense, ids, model_label = _e2e_inputs(model_folder, DTYPES[dtype_name], prompt, quick)
    prompt = ids.shape[1]
    sparse = copy.deepcopy(dense)
    report = compress(sparse, progress=False)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    results = {}
    for label, model in (("dense", dense), ("sparse", sparse)):
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        results[label] = (time.perf_counter() - start, out[0, prompt:].tolist())
    dense_s, dense_tokens = results["dense"]
    sparse_s, sparse_tokens = results["sparse"]
    divergence = first_divergence(dense, ids, dense_tokens, sparse_tokens)
    row = {
        "bench": "cpu_e2e", "model": model_label,
        "dtype": dtype_name, "threads": threads, "prompt": prompt, "new_tokens": new_tokens,
        "swapped": report.counts(), "dense_tok_s": round(new_tokens / dense_s, 3),
        "sparse_tok_s": round(new_tokens / sparse_s, 3), "speedup": round(dense_s / sparse_s, 3),
        "same_tokens": dense_tokens == sparse_tokens, **divergence, **env,
    }
    where = ""
    if divergence:
        where = (f" (first differs at new token {divergence['first_diff']}; the dense model's top-2 logit gap there: "
                 f"{divergence['dense_top2_gap']:.4g}, relative {divergence['dense_top2_gap_rel']:.2g})")
    print(f"e2e {row['model']} {dtype_name} t={threads}: dense {row['dense_tok_s']:.2f} tok/s, sparse "
          f"{row['sparse_tok_s']:.2f} tok/s = {row['speedup']:.2f}x, same greedy tokens: {row['same_tokens']}{where}",
          flush=True)
    return row


@torch.no_grad()
def first_divergence(dense, ids: torch.Tensor, dense_tokens: list[int], sparse_tokens: list[int]) -> dict:
    """Where two greedy continuations first differ (``{}`` when they do not), and the dense model's gap between its
    two largest logits at that step (absolute, and relative to the largest logit's magnitude): a gap at the
    rounding level of the dtype is a near-tie that another summation order can flip."""
    first = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b), None)
    if first is None:
        return {}
    prefix = torch.cat([ids, torch.tensor([dense_tokens[:first]], dtype=ids.dtype)], dim=1)
    top2 = dense(prefix).logits[0, -1].float().topk(2).values
    gap = float(top2[0] - top2[1])
    return {"first_diff": first, "dense_top2_gap": round(gap, 6),
            "dense_top2_gap_rel": round(gap / max(abs(float(top2[0])), 1e-12), 6)}


def goal_table(rows: list[dict], tier: str | None = None) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) per goal of issue 14 over the rows of this run (the layer rows of ``tier`` only, when
    given: the tier in use, not the ones timed beside it for comparison)."""
    table = []
    for (fmt, m), need in GOALS.items():
        for dtype in DTYPES:
            picked = [r for r in rows if r["bench"] == "cpu_layer" and r["format"] == fmt and r["tokens"] == m
                      and r["dtype"] == dtype and tier in (None, r["isa"])]
            if picked:
                worst = min(r["speedup"] for r in picked)
                limit = min(r["limit"] for r in picked)
                table.append((f"{fmt} {dtype} weights, M={m}: >= {need}x the faster dense, every shape / thread count",
                              f"min {worst:.2f}x, max {max(r['speedup'] for r in picked):.2f}x over {len(picked)} "
                              f"rows (byte limit {limit:.2f}x)", worst >= need))
    for r in (r for r in rows if r["bench"] == "cpu_e2e"):
        table.append((f"end to end ({r['dtype']}, {r['threads']} threads): >= 1.3x tokens/s, identical greedy output",
                      f"{r['speedup']:.2f}x, same tokens: {r['same_tokens']}", r["speedup"] >= 1.3 and r["same_tokens"]))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSONL file the rows are appended to")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape (its weight not rotated), tiny e2e model (a smoke test)")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer rows")
    parser.add_argument("--e2e", action="store_true", help="also the end-to-end greedy decoding row")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="layer shapes (default: all three)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--e2e-model", default=None, metavar="FOLDER",
                        help="--e2e on this local causal LM folder instead of the Llama built in code")
    parser.add_argument("--prefill", action="store_true", help="also the prefill rows (row kernels vs dense GEMMs)")
    parser.add_argument("--prefill-shape", type=int, nargs=2, default=[4096, 11008], metavar=("IN", "OUT"))
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[8, 12, 16, 24, 32, 48, 64, 128, 512])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the calling thread's CPU time (needs --threads 1)")
    parser.add_argument("--isas", nargs="+", default=None, metavar="TIER",
                        help="time the sparse layers on each of these native tiers beside the same dense timings "
                        "(default: the tier in use); the goal table counts the tier in use")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="re-run with the native AVX2 tier and torch's dense kernels limited to AVX2 (AVX2_ENV)")
    args = parser.parse_args(argv)
    if args.e2e_model and not args.e2e:
        parser.error("--e2e-model needs --e2e")
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu needs --threads 1 (other threads' CPU time would not be counted)")
    if args.emulate_avx2 and any(os.environ.get(name) != value for name, value in AVX2_ENV.items()):
        # torch reads these when it is imported (already done here): a fresh process with them set
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              env={**os.environ, **AVX2_ENV}).returncode
    global _clock
    _clock = CLOCKS[args.clock]

    from vlmsparse.kernels import cpu

    if not cpu.native_available():
        print(f"native CPU kernels not available: {cpu.unavailable_reason()}", file=sys.stderr)
        return 2
    env = {**environment("cpu"), "isa": cpu.isa(), "clock": args.clock,
           "dense_isa": torch.backends.cpu.get_cpu_capability()}
    if args.emulate_avx2:
        if env["dense_isa"] != "AVX2" or env["isa"] != "avx2":
            print(f"--emulate-avx2: torch runs {env['dense_isa']} and the native kernels {env['isa']}, not AVX2",
                  file=sys.stderr)
            return 2
        env["note"] = "AVX2 tier, dense restricted to AVX2, load {load}"
    if args.isas:
        unknown = [tier for tier in args.isas if tier not in cpu.supported_isas()]
        if unknown:
            parser.error(f"--isas: this CPU or build has no tier {', '.join(unknown)}; it has "
                         f"{', '.join(cpu.supported_isas())}")
        if env["isa"] not in args.isas:
            parser.error(f"--isas must include the tier in use, {env['isa']} (the goal table counts it)")
    threads = args.threads or sorted({1, torch.get_num_threads()})
    rows = []
    if not args.no_layers:
        shapes = QUICK_SHAPES if args.quick else {name: SHAPES[name] for name in args.shapes or SHAPES}
        # --quick is a smoke test: its one small weight is not rotated (hundreds of copies would take most of its time)
        rows += bench_layers(shapes, tuple(args.tokens), threads, args.repeats, env, tuple(args.isas or ()),
                             rotate_bytes=0 if args.quick else ROTATE_BYTES)
    if args.prefill:
        shape = (512, 1024) if args.quick else tuple(args.prefill_shape)
        rows += bench_prefill(shape, tuple(args.prefill_tokens), threads, args.repeats, env)
    if args.e2e:
        for dtype_name in DTYPES:
            rows.append(bench_e2e(dtype_name, max(threads), args.new_tokens, args.prompt, args.quick, env,
                                  args.e2e_model))
    out = args.out or RESULTS / f"cpu-{platform.machine()}-x{os.cpu_count()}.jsonl"
    for row in rows:
        if "note" in row:
            row["note"] = row["note"].format(load=row.get("load", os.getloadavg())[0])
    append_rows(out, rows)
    print(f"\n{len(rows)} rows appended to {out}\n\n| goal | measured | met |\n|---|---|---|")
    for goal, measured, met in goal_table(rows, env["isa"]):
        print(f"| {goal} | {measured} | {'yes' if met else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
