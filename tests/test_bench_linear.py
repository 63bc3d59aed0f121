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
