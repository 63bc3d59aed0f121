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
    with pytest.raises(RuntimeError, match="not 0.75"):
        bench.check_pruned_alike(model, reference, "0.75", "other")
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():  # 50% zeros, but not 2:4: two zeros then two kept in every group of 8
        down.copy_(torch.arange(1, down.numel() + 1, dtype=down.dtype).reshape(down.shape))
        down.view(-1, 8)[:, :4] = 0
    with pytest.raises(RuntimeError, match="down_proj has sparsity 0.5000, not 2:4"):
        bench.check_pruned_alike(model, reference, "2:4", "other")


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
