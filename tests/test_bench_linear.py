"""benchmarks/bench_linear.py on a CPU-only machine: reference rows with the environment, GPU rows missing."""

from __future__ import annotations

import importlib.util
import json
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
