"""benchmarks/bench_linear.py on a CPU-only machine: reference rows with the environment, GPU rows missing; the
parts of benchmarks/run_gpu.sh that run without a GPU (environment record, summary table)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of the benchmark")
def test_bench_linear_cpu_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_linear", ROOT / "benchmarks" / "bench_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--out", str(out), "--tokens", "1", "--cases", "fwd", "lora_fwd"]) == 0
    printed = capsys.readouterr().out
    assert "GPU rows" in printed and "missing" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["case"], r["provider"]) for r in rows} == {
        ("fwd", "dense"), ("fwd", "reference"), ("lora_fwd", "dense"), ("lora_fwd", "reference")}
    for row in rows:
        assert row["ms"] > 0 and row["error"] is None and row["tokens"] == 1
        for key in ("device", "torch", "triton", "commit", "date", "speedup", "in", "out", "dtype"):
            assert key in row
    # appending, not overwriting
    bench.main(["--out", str(out), "--tokens", "1", "--cases", "fwd"])
    assert len(out.read_text().splitlines()) == len(rows) + 2


def _goals():
    spec = importlib.util.spec_from_file_location("goals", ROOT / "benchmarks" / "goals.py")
    goals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goals)
    return goals


def _lin(case, provider, shape, tokens, ms, speedup, dtype="fp16", **extra):
    return {"bench": "linear", "case": case, "provider": provider, "shape": shape, "dtype": dtype, "tokens": tokens,
            "ms": ms, "speedup": speedup, "device": "GPU", "torch": "2.11", "triton": "3.6", "commit": "c", **extra}


def test_goal_table_judges_the_worst_case_and_reports_missing_rows(tmp_path):
    goals = _goals()
    rows = [_lin("fwd", "triton24", s, t, 0.01, 1.7) for s in goals.GOAL_SHAPES for t in (1, 16)]
    rows[3]["speedup"] = 1.4  # one shape / M misses: the goal fails on it
    rows += [_lin("fwd", p, s, t, 1.0, v) for s in goals.GOAL_SHAPES for t, v in ((2048, 0.98), (8192, 1.25))
             for p in ("torch24",)] + [_lin("fwd", "triton24", "llava7b-up", 2048, 1.0, 0.3)]
    for s in goals.GOAL_SHAPES:
        for t in (2048, 8192):
            rows += [_lin("lora_fwd_bwd", "full_ft", s, t, 1.0, None, extra_peak_mb=100.0),
                     _lin("lora_fwd_bwd", "dense_lora", s, t, 0.9, None, extra_peak_mb=50.0),
                     _lin("lora_fwd_bwd", "dense_gemm_lora", s, t, 1.1, None, extra_peak_mb=90.0)]
    (tmp_path / "gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stray.jsonl").mkdir()  # folders named like row files are skipped
    table = {row["goal"][0]: row for row in goals.goal_table(goals.read_rows([tmp_path]))}
    assert table["1"]["status"] == "FAIL" and "x1.40 worst (llava7b-up fp16 M=16)" in table["1"]["measured"]
    assert table["2"]["status"] == "pass" and "M=2048: x0.98" in table["2"]["measured"]
    assert table["3"]["status"] == "missing" and table["5"]["status"] == "missing"
    assert table["4"]["status"] == "pass" and "1.10x full FT" in table["4"]["measured"]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "goals.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "triton 3.6" in result.stdout and result.stdout.count("\n") == 7  # header, column names, 5 goals


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU exit of run_gpu.sh")
def test_run_gpu_without_a_gpu_records_the_environment(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    recorded = (tmp_path / "env.txt").read_text()
    assert f"torch {torch.__version__}" in recorded and "no CUDA device" in recorded
    for package in ("transformers", "numpy", "pytest"):
        assert f"\n{package} " in recorded


def _bench_linear():
    spec = importlib.util.spec_from_file_location("bench_linear", ROOT / "benchmarks" / "bench_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("tokens", [3, 16])
def test_cslt_provider_pads_searches_once_and_checks_its_result(monkeypatch, tokens):
    """The ``cslt`` provider (``torch._cslt_sparse_mm`` called directly) with cuSPARSELt's ops replaced by a fake
    that computes the same product on the CPU: x is padded to a multiple of 8 rows and the padding cut off, the
    algorithm is searched once (on the first call) and reused, and a wrong first result raises instead of being
    timed. Without CUDA the provider is absent."""
    bench = _bench_linear()
    layers = bench._layer(16, 24, torch.float32, "cpu", copies=2)
    x, dy = torch.randn(tokens, 16), torch.randn(tokens, 24)
    assert all(lay["cslt"] is None for lay in layers) and bench._make_fn("fwd", "cslt", layers, x, dy) is None
    for lay in layers:
        lay["cslt"] = lay["weight"]  # the fake's "compressed" weight is the weight itself
    seen = {"search": [], "mm": []}

    def search(compressed, dense_b, bias=None, transpose_result=False):
        seen["search"].append(tuple(dense_b.shape))
        return 7

    def mm(compressed, dense_b, bias=None, transpose_result=False, alg_id=0):
        seen["mm"].append((tuple(dense_b.shape), alg_id, transpose_result))
        return torch.nn.functional.linear(dense_b.t(), compressed, bias)

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", mm, raising=False)
    fn = bench._make_fn("fwd", "cslt", layers, x, dy)
    outputs = [fn() for _ in range(3)]
    padded = (16, -(-tokens // 8) * 8)
    assert seen["search"] == [padded] and seen["mm"] == [(padded, 7, True)] * 3
    chosen = [layers[1], layers[0], layers[1]]  # the copies in turn
    for y, lay in zip(outputs, chosen):
        assert y.shape == (tokens, 24)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, lay["weight"], lay["bias"]))
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda *a, **k: 2 * mm(*a, **k), raising=False)
    with pytest.raises(RuntimeError, match="differs from F.linear"):
        bench._make_fn("fwd", "cslt", layers, x, dy)()
