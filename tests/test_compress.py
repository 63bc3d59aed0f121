"""compress / decompress swaps and the compressed checkpoint format (round trip bit for bit, tiny LLaVA)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlmsparse.modules.sparse_linear import SparseLinear
from vlmsparse.pipeline.compress import (
    INDEX_FILENAME,
    compress,
    decompress,
    load_compressed,
    pack_bitmask,
    save_compressed,
    unpack_bitmask,
)
from vlmsparse.sparsity import mask_nm

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(_INT[a.dtype]), b.contiguous().view(_INT[b.dtype]))


def _prune24(model: nn.Module, names) -> dict[str, torch.Tensor]:
    masks = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            masks[name] = mask_nm(weight.abs().float(), 2, 4)
            weight.masked_fill_(~masks[name], 0)
    return masks


def test_bitmask_round_trip_odd_width():
    mask = torch.rand(5, 13) > 0.5
    bits = pack_bitmask(mask)
    assert bits.shape == (5, 2) and bits.dtype == torch.uint8
    assert torch.equal(unpack_bitmask(bits, 13), mask)
    assert int(pack_bitmask(torch.tensor([[True] + [False] * 7]))[0, 0]) == 1  # bit 0 = column 0


def test_compress_swaps_24_linears_and_inverts():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 8))
    masks = _prune24(model, ["0", "2"])
    x = torch.randn(3, 32)
    want = model(x)
    report = compress(model, backend="packed24", progress=False)
    assert report.swapped == ["0", "2"] and report.counts() == {"packed24": 2}
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert type(model[3]) is nn.Linear  # dense weight: not eligible
    assert torch.equal(model(x), want)
    assert decompress(model) == 2 and type(model[0]) is nn.Linear
    assert torch.equal(model(x), want)
    # masks select: only "2" listed
    report = compress(model, masks={"2": masks["2"]}, backend="packed24", progress=False)
    assert report.swapped == ["2"]
    decompress(model)
    # filter_fn excludes; auto on CPU resolves to no swap (no fast path)
    assert compress(model, backend="packed24", filter_fn=lambda m, n: n != "0", progress=False).swapped == ["2"]
    decompress(model)
    report = compress(model, progress=False)
    assert report.swapped == [] and report.counts() == {"dense": 2}


def test_compress_auto_times_each_shape():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    _prune24(model, ["0", "1"])
    report = compress(model, auto=True, backend="packed24", tokens=(2,), progress=False)
    assert len(report.layers) == 2
    assert all(d.dense_ms is not None and d.sparse_ms is not None for d in report.layers)
    assert report.layers[0].dense_ms == report.layers[1].dense_ms  # one measurement per distinct shape
    for d in report.layers:  # the decision follows the measurement
        assert (d.backend == "packed24") == (d.sparse_ms < d.dense_ms)
    with pytest.raises(ValueError, match="tokens"):
        compress(model, auto=True, tokens=(0,), progress=False)


def test_compress_rejects_mask_weight_mismatch():
    model = nn.Sequential(nn.Linear(16, 8))
    mask = mask_nm(torch.rand(8, 16), 2, 4)
    with pytest.raises(ValueError, match="not 2:4"):
        compress(model, masks={"0": mask}, progress=False)


@pytest.mark.slow
def test_tiny_llava_compressed_checkpoint_round_trip(tmp_path):
    from factories import llava_inputs, tiny_llava

    from vlmsparse.models import prunable_linear_names

    model = tiny_llava(0).eval()
    names = prunable_linear_names(model, ("vision", "language"))
    _prune24(model, names[1:])
    # one layer unstructured 50% (bitmask format), one -0.0 kept in a 2:4 layer (bit-exact check)
    first = model.get_submodule(names[0]).weight
    with torch.no_grad():
        first.masked_fill_(torch.rand_like(first) < 0.5, 0)
        w = model.get_submodule(names[1]).weight
        row = w[0, :4]
        row[int(row.nonzero()[0])] = -0.0  # a kept entry that is -0.0: still 2 set bit patterns per group
    inputs = llava_inputs()
    with torch.no_grad():
        want = model(**inputs).logits

    report = save_compressed(model, tmp_path / "ckpt")
    assert report["formats"]["packed24"] == len(names) - 1 and report["formats"]["bitmask"] >= 1
    assert report["file_bytes"] < report["dense_bytes"]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]

    loaded = load_compressed(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert _bits_equal(sd_a[key], sd_b[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)

    sparse = load_compressed(tmp_path / "ckpt", as_sparse=True, backend="packed24")
    n_sparse = sum(isinstance(m, SparseLinear) for m in sparse.modules())
    assert n_sparse == len(names) - 1
    with torch.no_grad():
        assert torch.equal(sparse(**inputs).logits, want)
    # saving the SparseLinear model again gives the same tensors
    save_compressed(sparse, tmp_path / "again")
    again = load_compressed(tmp_path / "again")
    for key, value in again.state_dict().items():
        assert _bits_equal(value, sd_a[key]), key


def test_load_rejects_other_format_version(tmp_path):
    from factories import tiny_llama

    model = tiny_llama(0)
    save_compressed(model, tmp_path)
    index = json.loads((tmp_path / INDEX_FILENAME).read_text())
    index["format_version"] = "99"
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="version '99'"):
        load_compressed(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a compressed"):
        load_compressed(tmp_path / "missing")


def test_cli_compress_and_decompress(tmp_path, capsys):
    from factories import tiny_llama

    from vlmsparse.cli import main

    model = tiny_llama(0).eval()
    _prune24(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n])
    model.save_pretrained(str(tmp_path / "src"))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert main(["compress", str(tmp_path / "src"), "-o", str(tmp_path / "c"), "--auto", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "MiB dense" in out and "saved to" in out
    index = json.loads((tmp_path / "c" / INDEX_FILENAME).read_text())
    assert index["plan"]["counts"] and index["size"]["formats"]["packed24"] == 14
    assert main(["compress", str(tmp_path / "c"), "-o", str(tmp_path / "d"), "--decompress"]) == 0
    from vlmsparse.pipeline.save import load_model

    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "d")(input_ids=ids).logits, want)
