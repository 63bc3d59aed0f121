"""``vlmsparse demo --quick`` through the command line: the real quick grid, its files and invariants."""

from __future__ import annotations

import json

import pytest

from vlmsparse.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick_cli(tmp_path, capsys):
    assert main(["demo", "--quick", "--workdir", str(tmp_path), "--no-progress", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["config"]["quick"] and results["dense"]["accuracy"] >= 0.85
    assert {(r["method"], r["pattern"], r["allocation"]) for r in results["prune"]} == {
        (m, p, a) for m in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "0.7", "2:4") for a in ("equal", "language")
    }
    for r in results["prune"]:
        assert abs(r["measured_sparsity"] - r["asked_sparsity"]) <= 1 / 64
    for r in results["restore"]:
        if r["restore"] == "lora":
            assert r["sparsity_after"] < r["asked_sparsity"]
        else:
            assert r["mask_kept"] and r["sparsity_after"] == r["sparsity_before"]
    for name in ("results.json", "report.md", "accuracy_vs_sparsity.png", "restore.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["prune"] == results["prune"]
