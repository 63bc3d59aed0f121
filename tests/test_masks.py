"""MaskSet save/load round trip (bit-packed, version 1 files still read), validation, atomic writes and
their permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from vlmsparse._io import atomic_write, current_umask
from vlmsparse.masks import MASKS_FILENAME, MaskSet, pack_bitmask, unpack_bitmask
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


_ODD_SHAPES = [(5, 13), (3, 1), (7, 8), (2, 17), (1, 9), (4, 0)]


def test_saved_masks_are_bit_packed_and_round_trip_odd_widths(tmp_path):
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(0)
    masks = MaskSet({f"m{i}": torch.rand(shape, generator=gen) > 0.5 for i, shape in enumerate(_ODD_SHAPES)})
    path = masks.save(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["version"] == "2"
        for name, mask in masks.items():
            stored = f.get_tensor(name)  # 8 columns per byte, the bit order of the compressed checkpoints
            assert stored.dtype == torch.uint8 and stored.shape == (mask.shape[0], (mask.shape[1] + 7) // 8)
            assert torch.equal(stored, pack_bitmask(mask))
    loaded = MaskSet.load(path)
    assert list(loaded) == list(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask), name


def test_mask_file_is_an_eighth_of_a_byte_per_weight(tmp_path):
    masks = MaskSet({"fc": torch.rand(256, 1000, generator=torch.Generator().manual_seed(1)) > 0.5})
    size = os.path.getsize(masks.save(tmp_path))
    assert 256 * 125 <= size < 256 * 125 + 1024  # payload + header; was 256 * 1000 bytes as uint8


def test_one_packing_helper_shared_with_compress():
    from vlmsparse.pipeline import compress

    assert compress.pack_bitmask is pack_bitmask and compress.unpack_bitmask is unpack_bitmask
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[1, 9] = True
    assert pack_bitmask(mask).tolist() == [[1, 0], [0, 2]]  # bit j of byte b = column 8b + j
    with pytest.raises(ValueError, match=r"expected uint8 \[out, 3\] for 17 columns, got torch.uint8 \(2, 2\)"):
        unpack_bitmask(pack_bitmask(mask), 17)


def test_reads_version_1_files(tmp_path):
    """Files written before bit packing (one uint8 per entry, version "1") still load."""
    import json

    from safetensors.torch import save_file

    masks = _maskset()
    tensors = {name: mask.to(torch.uint8) for name, mask in masks.items()}
    metadata = {"format": "vlmsparse.masks", "version": "1", "patterns": json.dumps(masks.patterns),
                "method": "wanda", "info": "{}", "order": json.dumps(list(masks))}
    save_file(tensors, str(tmp_path / MASKS_FILENAME), metadata=metadata)
    loaded = MaskSet.load(tmp_path)
    assert list(loaded) == list(masks) and loaded.patterns == masks.patterns and loaded.method == "wanda"
    for name, mask in masks.items():
        assert torch.equal(loaded[name], mask)
    metadata["version"] = "3"
    save_file(tensors, str(tmp_path / MASKS_FILENAME), metadata=metadata)
    with pytest.raises(ValueError, match="version '3'; this vlmsparse reads versions 1, 2"):
        MaskSet.load(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").close())
        path = _maskset().save(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
