"""benchmarks/bench_train_step.py: every method sets up the same trainable layers; the packed-base SparseLoRA
method keeps the frozen 2:4 weights packed (fewer model bytes) and trains the same function. Speed is not checked."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train_step as bench  # noqa: E402


def test_methods_train_the_same_layers_and_packed_holds_fewer_bytes():
    build = bench.linear_case(64, 128, 8, torch.device("cpu"), torch.float32)
    held, losses = {}, {}
    for method in bench.METHODS:
        model, masks, loss_fn = build()
        params = bench.prepare(method, model, masks, r=4, alpha=8)
        assert params and all(p.requires_grad for p in params)
        held[method] = bench.model_bytes(model)
        losses[method] = loss_fn(model).item()
    weight, mask = 64 * 128 * 4, 64 * 128
    assert held["sparselora"] >= weight + mask
    assert held["sparselora-packed"] < weight * 17 / 32 + 4 * (4 * 128 + 64 * 4) + 1024  # values + meta + A, B
    # B starts random (init_lora_weights=False) with the same seed: both SparseLoRA layers compute the same loss
    torch.testing.assert_close(losses["sparselora-packed"], losses["sparselora"], rtol=1e-5, atol=1e-5)
