"""MaskSet save/load round trip, validation and atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from vlmsparse.masks import MASKS_FILENAME, MaskSet, atomic_write
from vlmsparse.sparsity import mask_nm


def _maskset() -> MaskSet:
    a = mask_nm(torch.rand(8, 16), 2, 4)
    b = torch.rand(4, 8) > 0.3
    return MaskSet({"model.layers.0.q": a, "model.layers.0.fc": b}, {"model.layers.0.q": "2:4", "model.layers.0.fc": "0.7"}, "wanda", {"seed": "0"})


def test_round_trip(tmp_path):
    masks = _maskset()
    path = masks.save(tmp_path)
    assert path == tmp_path / MASKS_FILENAME
    loaded = MaskSet.load(tmp_path)
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], masks[name])
    assert loaded.patterns == masks.patterns and loaded.method == "wanda" and loaded.info == {"seed": "0"}
    assert loaded.sparsity() == pytest.approx(masks.sparsity())
    assert "model.layers.0.q" in loaded and len(loaded) == 2


def test_validation():
    with pytest.raises(ValueError, match="2-D bool"):
        MaskSet({"x": torch.ones(4, 4)})
    with pytest.raises(ValueError, match="without a mask"):
        MaskSet({"x": torch.ones(4, 4, dtype=torch.bool)}, {"y": "2:4"})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prune the model first"):
        MaskSet.load(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / MASKS_FILENAME))
    with pytest.raises(ValueError, match="not a vlmsparse mask file"):
        MaskSet.load(tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary left behind
