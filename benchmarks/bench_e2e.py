"""End to end on a 7B-shaped Llama (LLaVA-1.5's language model widths), random weights, 2:4 pruned, built in code.

Measured side by side in one run, every ratio against the dense run of the same (pruned) weights:

- ``decode``: greedy decode tokens/s with Hugging Face's static cache, ``generate`` compiling the decode step
  (``CompileConfig(fullgraph=True)``, ``mode="reduce-overhead"``: CUDA graphs on a GPU); decode-only time =
  time(prompt + N new tokens) - time(prompt + 1 new token). Variants: ``dense`` (the pruned model, nn.Linear),
  ``packed24`` and ``torch24`` (every 2:4 linear swapped by ``compress``; torch24 only where torch semi-structured
  runs), ``auto`` (``compress(auto=True, tokens=(1, 16, prefill), dense_copy=True)``: the package's measured
  choice per layer shape).
- ``prefill``: one forward over ``--prefill`` tokens (batch 1, last-token logits), eager (the kernels dominate at
  2048 tokens; ``--compile-prefill`` compiles it, at one more compilation per variant), per variant.
- ``train``: one finetuning step (forward, loss, backward, AdamW) at ``--train-batch`` x ``--train-seq`` tokens:
  ``sparselora`` (``add_sparse_lora``, the default backend), ``sparselora_packed`` (the same adapters over packed
  2:4 bases: ``compress(..., backend="packed24")`` then ``add_sparse_lora(model, None)``) vs ``peft_lora`` (peft
  LoRA on the same pruned model), r=16 on every linear of the blocks; peak memory of the step and the bytes the
  prepared model holds (``model_mb``) too.

Modes: default (GPU) 32 layers; ``--quick`` 4 layers (what ``benchmarks/run_gpu.sh`` runs); ``--tiny`` a CPU
smoke mode (hidden 64, 2 layers, a few tokens, compile backend ``eager``) that checks the wiring, not speed.
Rows (``bench: "e2e"``, one per metric and variant, with device, versions, git commit and date) are appended
to ``--out`` (default ``benchmarks/results/<machine>.jsonl``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rows import RESULTS, append_rows, environment, model_bytes, results_machine  # noqa: E402

LLAVA15_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """The Llama of ``args`` with random weights, every linear of the blocks magnitude-pruned to 2:4; returns
    ``(model, masks)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmsparse.sparsity import mask_nm

    widths = TINY if args.tiny else LLAVA15_7B
    config = LlamaConfig(**widths, num_hidden_layers=args.layers, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.normal_(0, 0.02)
                masks[name] = mask_nm(module.weight.abs().float(), 2, 4)
                module.weight.masked_fill_(~masks[name], 0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, masks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile_config(args: argparse.Namespace, device: torch.device):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=args.compile_backend,
                           mode="reduce-overhead" if device.type == "cuda" else None)
    if device.type != "cuda":
        config._compile_all_devices = True  # HF compiles only on accelerators unless told (the CPU smoke mode)
    return config


@torch.no_grad()
def decode_and_prefill(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """``{"decode_tokens_per_s", "prefill_ms"}`` of ``model`` as it is (dense or compressed)."""
    from transformers import StaticCache

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)
    compile_config = _compile_config(args, device)

    def generate(new_tokens: int):
        # one cache length for every call: the compiled decode step is reused, not recompiled
        cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.decode_tokens)
        return model.generate(prompt, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, compile_config=compile_config, pad_token_id=0)

    out = generate(args.decode_tokens)
    assert out.shape[1] == args.prompt + args.decode_tokens, out.shape
    full = _timed(lambda: generate(args.decode_tokens), device, args.repeats)
    one = _timed(lambda: generate(1), device, args.repeats)
    decode_s = max(full - one, 1e-9)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=gen).to(device)

    def prefill(i):
        return model(input_ids=i, use_cache=False, logits_to_keep=1).logits

    if args.compile_prefill:
        prefill = torch.compile(prefill, fullgraph=True, backend=args.compile_backend)
    prefill_s = _timed(lambda: prefill(ids), device, args.repeats)
    return {"decode_tokens_per_s": (args.decode_tokens - 1) / decode_s, "prefill_ms": prefill_s * 1e3}


def _peak(device: torch.device, fn) -> tuple[float, float | None]:
    """``(seconds, peak MB above the start)`` of one ``fn()`` (peak on CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def train_step(method: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """``{"step_ms", "peak_mb", "model_mb"}`` of one finetuning step with ``method`` (``sparselora``,
    ``sparselora_packed`` or ``peft_lora``)."""
    import peft

    from vlmsparse.pipeline.compress import compress
    from vlmsparse.pipeline.lora import add_sparse_lora, lora_parameters

    model, masks = build(args, device, dtype)
    if method == "sparselora":
        add_sparse_lora(model, masks, r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False)
        params = lora_parameters(model)
    elif method == "sparselora_packed":
        compress(model, masks, backend="packed24", progress=False)
        add_sparse_lora(model, None, r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False)
        params = lora_parameters(model)
    else:
        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=sorted(masks),
                                 init_lora_weights=False)
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (args.train_batch, args.train_seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (optimizer state allocated)
    seconds, peak = _peak(device, step)
    seconds = statistics.median([seconds] + [_peak(device, step)[0] for _ in range(args.repeats - 1)])
    return {"step_ms": seconds * 1e3, "peak_mb": peak, "model_mb": model_bytes(model) / 2**20}


def run(args: argparse.Namespace) -> list[dict]:
    from vlmsparse.pipeline.compress import compress, decompress
    from vlmsparse.sparse24 import semi_structured_support

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = environment(device)
    base = {"bench": "e2e", "model": "tiny-llama" if args.tiny else "llava15-7b-lm", "layers": args.layers,
            "dtype": args.dtype, "prompt": args.prompt, "decode_tokens": args.decode_tokens, "prefill": args.prefill,
            "train_tokens": f"{args.train_batch}x{args.train_seq}", "rank": args.rank, **env}
    rows = []

    def add(metric: str, variant: str, value: float | None, dense: float | None, higher_is_better: bool, **extra):
        ratio = None
        if value and dense:
            ratio = value / dense if higher_is_better else dense / value
        rows.append({**base, "metric": metric, "variant": variant, "value": value, "speedup": ratio, **extra})
        shown = f"{value:.3f}" if value is not None else "FAILED " + str(extra.get("error"))
        print(f"e2e {metric:20s} {variant:10s} {shown}" + (f"  x{ratio:.2f} vs dense" if ratio else ""), flush=True)

    model, _ = build(args, device, dtype)
    variants = ["dense", "packed24"]
    probe = next(m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)
    if semi_structured_support(probe)[0]:
        variants.append("torch24")
    if not args.no_auto:
        variants.append("auto")
    dense_metrics = None
    for variant in variants:
        extra = {}
        try:
            if variant == "auto":
                report = compress(model, auto=True, tokens=(1, 16, args.prefill), dense_copy=True, progress=False)
                extra["swapped"] = report.counts()
                if not report.swapped and dense_metrics is not None:  # the dense model again: not re-timed
                    add("decode_tokens_per_s", variant, dense_metrics["decode_tokens_per_s"],
                        dense_metrics["decode_tokens_per_s"], True, error=None, note="all layers kept dense", **extra)
                    add("prefill_ms", variant, dense_metrics["prefill_ms"], dense_metrics["prefill_ms"], False,
                        error=None, note="all layers kept dense", **extra)
                    continue
            elif variant != "dense":
                extra["swapped"] = compress(model, backend=variant, progress=False).counts()
            metrics = decode_and_prefill(model, args, device)
            error = None
        except Exception as exc:  # one variant failing must not stop the others
            metrics, error = {"decode_tokens_per_s": None, "prefill_ms": None}, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            decompress(model)
        if variant == "dense":
            dense_metrics = metrics
        dense_metrics = dense_metrics or {}
        add("decode_tokens_per_s", variant, metrics["decode_tokens_per_s"], dense_metrics.get("decode_tokens_per_s"),
            True, error=error, **extra)
        add("prefill_ms", variant, metrics["prefill_ms"], dense_metrics.get("prefill_ms"), False, error=error,
            **extra)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train, errors = {}, {}
    for method in ("peft_lora", "sparselora", "sparselora_packed"):
        try:  # one method failing must not stop the others
            train[method] = train_step(method, args, device, dtype)
        except Exception as exc:
            errors[method] = f"{type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peft_ms = train.get("peft_lora", {}).get("step_ms")
    for method in ("peft_lora", "sparselora", "sparselora_packed"):
        got = train.get(method, {})
        add("train_step_ms", method, got.get("step_ms"), peft_ms, False, peak_mb=got.get("peak_mb"),
            model_mb=got.get("model_mb"), error=errors.get(method))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers (run_gpu.sh's default)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: hidden 64, 2 layers, a few tokens")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 (fp32 with --tiny)")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--prefill", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--train-seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager "
                        "with --tiny)")
    parser.add_argument("--compile-prefill", action="store_true")
    parser.add_argument("--no-auto", action="store_true", help="skip the auto variant (one compilation less)")
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(layers=2 if tiny else 4 if args.quick else 32, device="cuda" if torch.cuda.is_available() and
                    not tiny else "cpu", dtype="fp32" if tiny else "bf16", prompt=4 if tiny else 16,
                    decode_tokens=4 if tiny else 128, prefill=16 if tiny else 2048, train_batch=2 if tiny else 8,
                    train_seq=8 if tiny else 512, repeats=1 if tiny else 3, compile_backend="eager" if tiny
                    else "inductor")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be >= 2 (decode time is N tokens minus 1)")
    machine = args.machine or results_machine(args.device)
    out = Path(args.out) if args.out else RESULTS / f"{machine}.jsonl"
    rows = run(args)
    append_rows(out, rows)
    print(f"{len(rows)} rows appended to {out}")
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
