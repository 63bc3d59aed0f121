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


def _run_gpu_summary() -> str:
    """The summary program of benchmarks/run_gpu.sh (its heredoc)."""
    text = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
    return text.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF\n", 1)[0]


def test_run_gpu_summary_reads_row_files_only(tmp_path):
    """The summary takes bench_linear rows from the *.jsonl files under $OUT and skips folders and other rows."""
    row = {"bench": "linear", "case": "fwd", "provider": "triton24", "shape": "llava7b-up", "dtype": "fp16",
           "tokens": 1, "ms": 0.01, "speedup": 1.7, "device": "GPU", "torch": "2.11", "triton": "3.6", "commit": "c"}
    (tmp_path / "bench_linear.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "prune-gpu.jsonl").write_text(json.dumps({"method": "wanda", "total_s": 1.0}) + "\n")
    (tmp_path / "stray.jsonl").mkdir()
    result = subprocess.run([sys.executable, "-", str(tmp_path)], input=_run_gpu_summary(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "triton 3.6" in result.stdout and "x1.70" in result.stdout
    assert "decode M<=16 packed 2:4 Triton, 4096x11008 (worst of fp16/bf16, M=1/16): x1.70" in result.stdout


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
