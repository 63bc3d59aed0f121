"""benchmarks/bench_prune.py: its rows, the pieces of ``--compare-llmcompressor`` (Markov text, held-out
perplexity, the check that both tools pruned the same linears alike), the clear refusal without the optional
llmcompressor package, and (where that package is installed) one small comparison end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "128", "--samples", "4",
        "--seqlen", "16", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prune", ROOT / "benchmarks" / "bench_prune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_rows(bench, tmp_path):
    assert bench.main([*TINY, "--methods", "wanda,sparsegpt", "--sparsity", "2:4", "--out", str(tmp_path)]) == 0
    (rows_file,) = tmp_path.glob("prune-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["wanda", "sparsegpt"]
    for row in rows:
        assert row["sparsity_achieved"] == 0.5 and row["total_s"] > 0 and row["bench"] == "prune"
        for key in ("device", "torch", "transformers", "git_commit", "date", "threads"):
            assert key in row


def test_markov_tokens_are_a_seeded_order_one_chain(bench):
    walk = bench.markov_tokens(5000, 128, seed=1)
    assert walk.shape == (5000,) and walk.dtype == torch.long
    assert int(walk.min()) >= 3 and int(walk.max()) < 128
    assert torch.equal(walk, bench.markov_tokens(5000, 128, seed=1))
    other = bench.markov_tokens(5000, 128, seed=2)
    assert not torch.equal(walk, other)
    successors: dict[int, set[int]] = {}
    for a, b in zip(walk.tolist(), walk[1:].tolist()):
        successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 4  # predictable text: at most 4 next tokens per context
    assert len(set(walk.tolist())) > 64  # and not a short loop


def test_heldout_perplexity_is_the_models_own_loss(bench):
    model = bench.build_model(1, 64, 128, 128, torch.float32, "cpu")
    tokens = bench.markov_tokens(16 * 6 + 5, 128, seed=3)  # the 5 left over are not scored
    windows = tokens[: 16 * 6].reshape(6, 16)
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=windows, labels=windows).loss))
    assert bench.heldout_perplexity(model, tokens, seqlen=16, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_check_pruned_alike(bench):
    from vlmsparse.pipeline.prune import prune_model

    model = bench.build_model(1, 64, 128, 128, torch.float32, "cpu")
    dense = bench.linear_sparsities(model)
    batches = [{"input_ids": bench.markov_tokens(32, 128, 0).reshape(2, 16)}]
    batches[0]["attention_mask"] = torch.ones_like(batches[0]["input_ids"])
    prune_model(model, method="wanda", sparsity="2:4", calibration=batches, progress=False)
    reference = bench.linear_sparsities(model)
    assert {n for n, s in reference.items() if s} == {n for n in dense if n != "lm_head"}
    assert bench.check_pruned_alike(model, reference, "2:4", "same") == reference
    with pytest.raises(RuntimeError, match="pruned other linears"):
        bench.check_pruned_alike(model, {**reference, "lm_head": 0.5}, "2:4", "other")
    with torch.no_grad():  # a zero row in a dense weight (a padding embedding tied to lm_head) is not pruning
        model.lm_head.weight[0] = 0
    assert bench.check_pruned_alike(model, reference, "2:4", "same")["lm_head"] > 0
    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():  # 3% zeros in a dense weight (a quantized checkpoint's small values): counted as pruned
        model.lm_head.weight.view(-1)[: head.numel() * 3 // 100] = 0
    with pytest.raises(RuntimeError, match=r"pruned other linears than vlmsparse: only \['lm_head'\] differ"):
        bench.check_pruned_alike(model, reference, "2:4", "other")
    dense_zeros = {**{name: 0.0 for name in reference}, "lm_head": bench.linear_sparsities(model)["lm_head"]}
    assert bench.check_pruned_alike(model, reference, "2:4", "same", dense=dense_zeros)["lm_head"] > 0.025
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    with pytest.raises(RuntimeError, match="not 0.75"):
        bench.check_pruned_alike(model, reference, "0.75", "other")
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # 50% zeros, but not 2:4: two zeros then two kept in every group of 8
        down.copy_(torch.arange(1, down.numel() + 1, dtype=down.dtype).reshape(down.shape))
        down.view(-1, 8)[:, :4] = 0
    with pytest.raises(RuntimeError, match="down_proj has sparsity 0.5000, not 2:4"):
        bench.check_pruned_alike(model, reference, "2:4", "other")


def test_stderr_held_is_shown_only_when_the_body_fails(bench, capsys):
    """The optional tools' progress bars are held back, and written out when their call raises."""
    with bench.stderr_held():
        print("a bar", file=sys.stderr)
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="broke"), bench.stderr_held():
        print("the bars before it broke", file=sys.stderr)
        raise RuntimeError("broke")
    assert capsys.readouterr().err == "the bars before it broke\n"


def test_compare_without_llmcompressor_says_how_to_install_it(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import llmcompressor raises ImportError
    with pytest.raises(SystemExit, match=r"needs the optional llmcompressor package .*\[compare\]"):
        bench.main([*TINY, "--compare-llmcompressor", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_compare_with_llmcompressor(bench, tmp_path):
    pytest.importorskip("llmcompressor")
    args = [*TINY, "--compare-llmcompressor", "--train-steps", "30", "--eval-tokens", "512", "--repeats", "2",
            "--out", str(tmp_path)]
    assert bench.main(args) == 0
    (rows_file,) = tmp_path.glob("prune-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["tool"], r["method"], r["sparsity"]) for r in rows] == [
        (tool, method, pattern) for pattern in ("2:4", "0.5") for method in ("wanda", "sparsegpt")
        for tool in ("vlmsparse", "llmcompressor")]
    for ours, theirs in zip(rows[::2], rows[1::2]):
        assert ours["linears_pruned"] == theirs["linears_pruned"] == 7  # q k v o gate up down, not lm_head
        assert ours["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=0.02)  # the same algorithms
        assert ours["perplexity"] != ours["dense_perplexity"]
        assert len(ours["runs_s"]) == len(theirs["runs_s"]) == 2 and ours["total_s"] == min(ours["runs_s"])
        assert len(ours["loadavg_1m_runs"]) == 2 and ours["llmcompressor"] == theirs["llmcompressor"]


# ------------------------------------------------------------------------- --compare-reference, --model, --text
@pytest.fixture(scope="module")
def reference_prune():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_prune

    return reference_prune


@pytest.mark.parametrize("method,pattern,propagate", [("wanda", "2:4", "pruned"), ("wanda", "0.5", "pruned"),
                                                      ("sparsegpt", "2:4", "pruned"), ("sparsegpt", "0.5", "pruned"),
                                                      ("sparsegpt", "4:8", "pruned"), ("wanda", "2:4", "dense"),
                                                      ("sparsegpt", "0.5", "dense")])
def test_reference_prune_equals_the_scalar_reference(reference_prune, method, pattern, propagate):
    """The vectorised reference of the benchmark against the float64 scalar one of the tests (immediate SparseGPT
    updates, masks chosen entry by entry), block by block on a tiny Llama: the same masks and weights."""
    import copy

    from factories import tiny_llama_config
    from test_prune_fidelity import ref_sequential_prune
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    model = LlamaForCausalLM(tiny_llama_config(hidden=32, layers=2)).eval().double()
    sequences = torch.randint(3, 120, (3, 10), generator=torch.Generator().manual_seed(6))
    scalar = copy.deepcopy(model)
    nm = tuple(map(int, pattern.split(":"))) if ":" in pattern else None
    # blocks of 16 columns x 32 or 64 rows: int(numel s) is the scalar reference's count too
    expected = ref_sequential_prune(scalar, sequences, method, pattern, blocksize=16, propagate=propagate)
    got = reference_prune.sequential_prune(model, sequences, method, None if nm else float(pattern), nm,
                                           blocksize=16, propagate=propagate)
    assert set(got) == set(expected) and len(got) == 14
    for name, keep in expected.items():
        assert torch.equal(got[name], keep), name
        assert keep.float().mean() == 0.5
    for (name, ours), theirs in zip(model.named_parameters(), scalar.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12, msg=name)


def test_python_docs_are_two_disjoint_halves(bench):
    calibration, held_out = bench.python_docs()
    assert len(calibration) >= 30 and len(held_out) >= 30
    assert not set(calibration) & set(held_out)
    assert sum(map(len, calibration)) > 100_000 and sum(map(len, held_out)) > 100_000
    assert bench.python_docs() == (calibration, held_out)


@pytest.fixture
def llama_folder(tmp_path):
    from factories import tiny_llama_config
    from transformers import LlamaForCausalLM

    from vlmsparse.data.vocab import build_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "llama"
    LlamaForCausalLM(tiny_llama_config(hidden=32, layers=2)).save_pretrained(folder)
    build_tokenizer([f"w{i}" for i in range(40)]).save_pretrained(folder)
    return folder


def _words(n: int, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 40, (n,), generator=generator).tolist())


def _compare_reference_args(tmp_path, llama_folder) -> list[str]:
    """A --compare-reference run of the tiny Llama folder on word text files, rows to ``tmp_path / "rows"``."""
    (tmp_path / "calibration.txt").write_text(_words(400, 1))
    (tmp_path / "held-out.txt").write_text(_words(300, 2))
    return ["--compare-reference", "--model", str(llama_folder), "--text", str(tmp_path / "calibration.txt"),
            "--eval-text", str(tmp_path / "held-out.txt"), "--samples", "4", "--seqlen", "16", "--batch-size", "2",
            "--eval-seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "rows")]


def test_compare_reference_on_a_model_folder_and_text_files(bench, tmp_path, llama_folder):
    out = tmp_path / "rows"
    assert bench.main(_compare_reference_args(tmp_path, llama_folder)) == 0
    (rows_file,) = out.glob("prune-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["tool"], r["method"], r["sparsity"]) for r in rows] == [
        (tool, method, pattern) for pattern in ("2:4", "0.5") for method in ("wanda", "sparsegpt")
        for tool in ("vlmsparse", "reference")]
    for ours, theirs in zip(rows[::2], rows[1::2]):
        assert ours["model"] == "llama" and ours["text"].endswith("calibration.txt")
        assert ours["eval_tokens"] == 300 and ours["eval_seqlen"] == 32  # a token per word
        assert ours["linears_pruned"] == theirs["linears_pruned"] == 14
        assert ours["perplexity"] != ours["dense_perplexity"]
        # the same algorithm on the same windows (only SparseGPT's unstructured counts per block may differ by one)
        assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-3)


def test_calibration_seed_draws_other_windows(bench, tmp_path, llama_folder):
    """--calibration-seed draws other calibration windows of a text; the held-out tokens stay the same."""
    import argparse

    (tmp_path / "calibration.txt").write_text(_words(400, 1))
    (tmp_path / "held-out.txt").write_text(_words(300, 2))

    def text_windows(seed):
        args = argparse.Namespace(text=str(tmp_path / "calibration.txt"), eval_text=str(tmp_path / "held-out.txt"),
                                  samples=4, seqlen=16, batch_size=2, eval_tokens=16384, eval_seqlen=32,
                                  calibration_seed=seed, model=str(llama_folder))
        batches, held_out, _, _ = bench._text_inputs(args, str(llama_folder))
        return torch.cat([b["input_ids"] for b in batches]), held_out

    (first, held), (again, held_again), (other, held_other) = text_windows(0), text_windows(0), text_windows(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(held, held_again) and torch.equal(held, held_other)


def test_compare_runs_the_methods_asked_for(bench, tmp_path, llama_folder, capsys):
    out = tmp_path / "rows"
    args = _compare_reference_args(tmp_path, llama_folder)
    assert bench.main([*args, "--methods", "sparsegpt", "--sparsity", "2:4"]) == 0
    (rows_file,) = out.glob("prune-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["tool"], r["method"]) for r in rows] == [("vlmsparse", "sparsegpt"), ("reference", "sparsegpt")]
    with pytest.raises(SystemExit):
        bench.main([*args, "--methods", "magnitude,wanda"])
    assert "the comparisons run wanda and sparsegpt" in capsys.readouterr().err


def test_compare_passes_the_propagation_to_every_tool(bench, tmp_path, llama_folder, monkeypatch):
    """--propagate dense reaches vlmsparse and the reference (the same masks as each other, so the same
    perplexity) and is recorded in the rows."""
    seen = []
    for tool, pruner in list(bench.PRUNERS.items()):
        def spy(*args, _pruner=pruner, _tool=tool, **kwargs):
            seen.append((_tool, kwargs["propagate"]))
            return _pruner(*args, **kwargs)
        monkeypatch.setitem(bench.PRUNERS, tool, spy)
        monkeypatch.setattr(bench, f"_prune_with_{tool}", spy)
    out = tmp_path / "rows"
    args = _compare_reference_args(tmp_path, llama_folder)
    assert bench.main([*args, "--methods", "wanda", "--sparsity", "2:4", "--propagate", "dense"]) == 0
    assert set(seen) == {("vlmsparse", "dense"), ("reference", "dense")}
    (rows_file,) = out.glob("prune-*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["propagate"] for r in rows] == ["dense", "dense"]
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-3)


def test_compare_refuses_bad_model_and_text_arguments(bench, tmp_path, llama_folder):
    common = ["--compare-reference", "--samples", "2", "--seqlen", "8", "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="no such file or folder"):
        bench.main([*common, "--model", str(tmp_path / "missing")])
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match="must be a .gguf checkpoint"):
        bench.main([*common, "--model", str(tmp_path / "weights.bin")])
    (tmp_path / "calibration.txt").write_text(_words(100, 1))
    with pytest.raises(SystemExit, match="needs --eval-text"):
        bench.main([*common, "--model", str(llama_folder), "--text", str(tmp_path / "calibration.txt")])
    (tmp_path / "short.txt").write_text(_words(5, 2))
    with pytest.raises(SystemExit, match="holds 5 tokens, fewer than one --eval-seqlen window"):
        bench.main([*common, "--model", str(llama_folder), "--text", str(tmp_path / "calibration.txt"),
                    "--eval-text", str(tmp_path / "short.txt")])
    with pytest.raises(SystemExit):  # argparse: --model without a comparison
        bench.main(["--model", str(llama_folder), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("prune-*.jsonl"))


def _write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, ffn: int = 64) -> None:
    """A two-block Llama in the GGUF layout of llama.cpp (the one SmolLM2's ``.gguf`` has): a byte-level BPE
    tokenizer (characters and two merges), float32 tensors but the embedding, which is Q8_0-quantized."""
    import gguf
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>", "w", "Ġ", *(str(i) for i in range(10)), "w1", "w2"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["w 1", "w 2"])  # two: transformers 5.17 reads a one-element array as its element
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    embedding = gguf.quants.quantize(matrix(len(tokens), hidden), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_checkpoint_is_dequantized_into_a_folder_and_compared(bench, tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = bench._checkpoint_folder(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    saved = LlamaForCausalLM.from_pretrained(folder)
    assert getattr(saved.config, "quantization_config", None) is None and saved.config.num_hidden_layers == 2
    want = direct.state_dict()
    assert saved.state_dict().keys() == want.keys()
    for name, value in saved.state_dict().items():
        assert torch.equal(value, want[name]), name
    assert len(torch.unique(saved.model.embed_tokens.weight)) < saved.model.embed_tokens.weight.numel()  # Q8_0
    text = "w1 w23 w4"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == \
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")(text).input_ids

    (tmp_path / "calibration.txt").write_text(_words(300, 1))
    (tmp_path / "held-out.txt").write_text(_words(200, 2))
    args = ["--compare-reference", "--model", str(tmp_path / "tiny.gguf"), "--text", str(tmp_path / "calibration.txt"),
            "--eval-text", str(tmp_path / "held-out.txt"), "--samples", "2", "--seqlen", "16", "--batch-size", "2",
            "--sparsity", "2:4", "--device", "cpu", "--out", str(tmp_path / "rows")]
    assert bench.main(args) == 0
    rows = [json.loads(line) for line in next((tmp_path / "rows").glob("prune-*.jsonl")).read_text().splitlines()]
    assert [(r["tool"], r["model"]) for r in rows] == [("vlmsparse", "tiny.gguf"), ("reference", "tiny.gguf")] * 2
