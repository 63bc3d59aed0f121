"""compress / decompress swaps, the compressed checkpoint format (round trip bit for bit, tiny LLaVA), and the
folders compress_folder / decompress_folder write (size report from the files, overwrite guard, permissions)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmsparse.masks import MASKS_FILENAME, MaskSet
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
from vlmsparse.pipeline.folders import compress_folder, decompress_folder
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


def test_compress_swaps_24_linears_and_inverts(without_native):
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


def test_compress_takes_negative_zeros_and_warns_when_nothing_is_swapped(tmp_path, caplog, without_native):
    """A weight pruned by ``w * mask`` (-0.0 where w < 0) is 2:4: swapped, saved packed, loaded equal; a compress
    that swaps nothing says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(mask_nm(layer.weight.abs(), 2, 4).float())
    assert bool(torch.signbit(model[0].weight[model[0].weight == 0]).any())
    x = torch.randn(3, 32)
    want = model(x)
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        report = compress(model, backend="packed24", progress=False)
    assert report.swapped == ["0", "2"] and "no linear was swapped" not in caplog.text
    assert torch.equal(model(x), want)
    decompress(model)

    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        assert compress(model, progress=False).swapped == []  # CPU, backend auto: no fast path
    assert "no linear was swapped" in caplog.text and "backend='packed24'" in caplog.text
    caplog.clear()
    dense = nn.Sequential(nn.Linear(16, 8))
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        assert compress(dense, backend="packed24", progress=False).not_24 == ["0"]
    assert "1 selected linears are not 2:4" in caplog.text and "e.g. 0" in caplog.text
    assert "sparse, e.g." not in caplog.text  # packed24 takes 2:4 weights only
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        assert compress(dense, progress=False).not_24 == ["0"]  # auto: 2:4, or sparse enough for a bitmask
    from vlmsparse.modules.sparse_linear import BITMASK_MIN_SPARSITY

    assert f"divisible by 4), nor {BITMASK_MIN_SPARSITY:.0%} sparse, e.g. 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        compress(dense, filter_fn=lambda m, n: False, progress=False)
    assert "no nn.Linear passed the selection" in caplog.text

    # a model of nn.Linear only is not a HF model: check the packed format through save_compressed's writer
    from vlmsparse.pipeline.compress import iter_compressed_tensors, write_compressed

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.config = type("Config", (), {"to_json_string": lambda self: "{}"})()

    report = write_compressed(Wrapped(model), tmp_path, 0.25, None)
    assert report["formats"]["packed24"] == 2
    loaded = {key: load() for key, _, load in iter_compressed_tensors(tmp_path)}
    for key, value in Wrapped(model).state_dict().items():
        assert torch.equal(loaded[key], value), key  # equal values; -0.0 may be +0.0


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


def test_cold_copies_fill_the_bytes_asked_for_and_compute_the_same():
    from vlmsparse.pipeline import compress as cp

    dense = nn.Linear(32, 64)
    _prune24(nn.Sequential(dense), ["0"])
    layer = SparseLinear(dense.weight.detach(), backend="packed24")
    nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
    copies = cp._cold_copies(layer)
    assert copies[0] is layer and len(copies) == min(cp.COLD_COPIES, -(-cp.COLD_BYTES // nbytes))
    x = torch.randn(3, 32)
    assert all(torch.equal(c(x), layer(x)) for c in copies[:3])
    assert copies[1].values.data_ptr() != layer.values.data_ptr()


def test_compress_auto_on_a_cpu_times_calls_over_copies(monkeypatch):
    """Each timed call on a CPU reads the next copy (a weight timed alone would be served from the cache)."""
    from vlmsparse.pipeline import compress as cp

    made, calls = [], {}
    real = cp._cold_copies

    def counted(layer):
        copies = real(layer)
        for c in copies:
            calls[id(c)] = 0
            c.register_forward_pre_hook(lambda m, a: calls.__setitem__(id(m), calls[id(m)] + 1))
        made.append(copies)
        return copies

    monkeypatch.setattr(cp, "COLD_BYTES", 3 * 32 * 32 * 4)  # three dense fp32 copies
    monkeypatch.setattr(cp, "_cold_copies", counted)
    model = nn.Sequential(nn.Linear(32, 32))
    _prune24(model, ["0"])
    compress(model, auto=True, backend="packed24", tokens=(2,), progress=False)
    dense, packed = made  # the dense layer and the packed one
    assert len(dense) == 3 and len(packed) >= 3
    assert all(calls[id(c)] >= 1 for c in dense + packed)


def test_compress_rejects_mask_weight_mismatch():
    model = nn.Sequential(nn.Linear(16, 8))
    mask = mask_nm(torch.rand(8, 16), 2, 4)
    with pytest.raises(ValueError, match="not 2:4"):
        compress(model, masks={"0": mask}, progress=False)


@pytest.mark.slow
def test_tiny_llava_compressed_checkpoint_round_trip(tmp_path, without_native):
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
    # each planned layer with its measured times per backend, named (not "2:4" for whichever was timed)
    line = next(li for li in out.splitlines() if li.startswith("model.layers.0.self_attn.q_proj: "))
    assert re.fullmatch(r"model\.layers\.0\.self_attn\.q_proj: \w+ \(ms at 2 tokens: dense [0-9.]+, "
                        r"packed24 [0-9.]+(, bitmask [0-9.]+)?\)", line), line
    index = json.loads((tmp_path / "c" / INDEX_FILENAME).read_text())
    assert index["plan"]["counts"] and index["size"]["formats"]["packed24"] == 14
    assert main(["compress", str(tmp_path / "c"), "-o", str(tmp_path / "d"), "--decompress"]) == 0
    from vlmsparse.pipeline.save import load_model

    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "d")(input_ids=ids).logits, want)


def _pruned_folder(path: Path) -> Path:
    """A tiny LLaMA folder with its language linears pruned 2:4 and their masks (sparsity_masks.safetensors)."""
    from factories import tiny_llama

    model = tiny_llama(0).eval()
    masks = _prune24(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n])
    model.save_pretrained(str(path))
    MaskSet(masks, {name: "2:4" for name in masks}).save(path)
    return path


def test_size_reports_count_the_files_on_disk(tmp_path):
    from safetensors import safe_open

    src = _pruned_folder(tmp_path / "src")
    report = compress_folder(src, tmp_path / "c")
    out = tmp_path / "c"
    compressed = {n: (out / n).stat().st_size for n in ("model.compressed.safetensors", MASKS_FILENAME)}
    dense = {n: (src / n).stat().st_size for n in ("model.safetensors", MASKS_FILENAME)}
    assert report["compressed_files"] == compressed and report["dense_files"] == dense
    assert report["file_bytes"] == sum(compressed.values()) and report["dense_bytes"] == sum(dense.values())
    assert report["ratio"] == report["file_bytes"] / report["dense_bytes"] < 1.0
    assert "model.compressed.safetensors + sparsity_masks.safetensors" in report["compares"]
    assert "model.safetensors + sparsity_masks.safetensors" in report["compares"]
    assert report["path"] == str(out.resolve()) and MASKS_FILENAME in report["copied"]
    # save_compressed: tensor bytes in the file vs the same tensors dense (headers out on both sides)
    tensors = report["tensors"]
    with safe_open(str(out / "model.compressed.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        dense_tensors = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert tensors["stored_bytes"] == stored and tensors["dense_bytes"] == dense_tensors
    assert tensors["ratio"] == stored / dense_tensors
    assert tensors["file_bytes"] == compressed["model.compressed.safetensors"]
    index = json.loads((out / INDEX_FILENAME).read_text())
    assert index["size"]["stored_bytes"] == stored and "path" not in index["size"]  # no temporary folder name


def test_folders_refuse_an_existing_output_unless_overwrite(tmp_path):
    src = _pruned_folder(tmp_path / "src")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_text("stale")
    (victim / "notes.txt").write_text("important")
    for run in (lambda **kw: compress_folder(src, victim, **kw), lambda **kw: decompress_folder(src, victim, **kw)):
        with pytest.raises(FileExistsError, match=r"already exists; .* pass overwrite=True \(--overwrite\)"):
            run()
        assert sorted(p.name for p in victim.iterdir()) == ["model.safetensors", "notes.txt"]
    with pytest.raises(ValueError, match="lies inside the input model"):
        compress_folder(src, src / "inner")
    with pytest.raises(ValueError, match="lies inside the input model"):
        compress_folder(src, src)
    compress_folder(src, victim, overwrite=True)  # replaced as a whole: no stale dense weights beside
    assert sorted(p.name for p in victim.iterdir()) == [
        "config.json", "generation_config.json", "model.compressed.safetensors", MASKS_FILENAME, INDEX_FILENAME]
    dense = decompress_folder(victim, tmp_path / "dense")
    assert not (dense / INDEX_FILENAME).exists() and (dense / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_cli_compress_refuses_existing_output_without_overwrite(tmp_path, capsys):
    from vlmsparse.cli import main

    src = _pruned_folder(tmp_path / "src")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("important")
    assert main(["compress", str(src), "-o", str(victim)]) == 2
    assert "already exists" in capsys.readouterr().err and (victim / "notes.txt").exists()
    assert main(["compress", str(src), "-o", str(victim), "--overwrite"]) == 0
    assert (victim / INDEX_FILENAME).exists() and not (victim / "notes.txt").exists()
    (tmp_path / "d").mkdir()
    assert main(["compress", str(victim), "-o", str(tmp_path / "d"), "--decompress"]) == 2
    assert main(["compress", str(victim), "-o", str(tmp_path / "d"), "--decompress", "--overwrite"]) == 0
    assert (tmp_path / "d" / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_folders_follow_the_umask(tmp_path, umask):
    src = _pruned_folder(tmp_path / "src")
    old = os.umask(umask)
    try:
        compress_folder(src, tmp_path / "c")
        decompress_folder(tmp_path / "c", tmp_path / "d")
    finally:
        os.umask(old)
    for folder in (tmp_path / "c", tmp_path / "d"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_write_folder_atomically_modes_and_failure(tmp_path):
    from vlmsparse._io import write_folder_atomically

    def write(tmp: Path) -> str:
        (tmp / "sub").mkdir(mode=0o700)
        os.close(os.open(tmp / "sub" / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors 0.8 does
        return "done"

    old = os.umask(0o027)
    try:
        assert write_folder_atomically(tmp_path / "out", write) == "done"
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "private.bin").stat().st_mode) == 0o640

    def failing(tmp: Path) -> None:
        (tmp / "half").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(tmp_path / "out", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old folder kept, no staging folder left
    assert (tmp_path / "out" / "sub" / "private.bin").exists()


def test_save_compressed_and_save_pruned_share_the_folder_guard(tmp_path):
    """The Python API: an existing non-empty folder is refused unless overwrite=True (then replaced as a whole:
    no stale weights beside the new ones), an empty folder is written into, the input folder is refused, and
    nothing is left staged. save_pruned has the same keyword and guard."""
    from factories import tiny_llama

    from vlmsparse.pipeline.save import save_pruned

    model = tiny_llama(0).eval()
    masks = MaskSet(_prune24(model, ["model.layers.0.self_attn.q_proj"]))
    for save, files in ((lambda out, **kw: save_compressed(model, out, **kw),
                         ["config.json", "model.compressed.safetensors", INDEX_FILENAME]),
                        (lambda out, **kw: save_pruned(model, masks, out, **kw),
                         ["config.json", "generation_config.json", "model.safetensors", MASKS_FILENAME])):
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "model.safetensors").write_text("stale")
        (victim / "notes.txt").write_text("important")
        with pytest.raises(FileExistsError, match=rf"{victim}.* already exists; .* pass overwrite=True to"):
            save(victim)
        assert sorted(p.name for p in victim.iterdir()) == ["model.safetensors", "notes.txt"]
        save(victim, overwrite=True)
        assert sorted(p.name for p in victim.iterdir()) == sorted(files)
        empty = tmp_path / "empty"
        empty.mkdir()
        save(empty)  # an empty folder, as save_pretrained users make one beforehand
        assert sorted(p.name for p in empty.iterdir()) == sorted(files)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
        for folder in (victim, empty):
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    report = save_compressed(model, tmp_path / "ckpt")
    assert report["path"] == str((tmp_path / "ckpt").resolve())
    loaded = load_compressed(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="input model"):
        save_compressed(loaded, tmp_path / "ckpt", overwrite=True)
    with pytest.raises(ValueError, match=r"min_sparsity must be in \[0, 1\], got 2"):
        save_compressed(model, tmp_path / "bad", min_sparsity=2)
    assert not (tmp_path / "bad").exists()


def test_save_compressed_follows_the_umask(tmp_path):
    from factories import tiny_llama

    old = os.umask(0o022)
    try:
        save_compressed(tiny_llama(0), tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    for path in (tmp_path / "ckpt").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_save_compressed_writes_processor_and_masks(tmp_path):
    """With processor and masks the compressed folder is complete: processor, masks and model load from it."""
    from factories import pruned_tiny, synthetic_processor
    from transformers import AutoProcessor

    from vlmsparse.pipeline.save import load_pruned

    model, masks = pruned_tiny("llava", "2:4")
    processor = synthetic_processor("llava")
    save_compressed(model, tmp_path / "ckpt", processor=processor, masks=masks)
    loaded, loaded_masks = load_pruned(tmp_path / "ckpt")
    assert loaded_masks.masks.keys() == masks.masks.keys()
    assert all(torch.equal(loaded_masks[n], masks[n]) for n in masks.masks)
    for key, value in model.state_dict().items():
        assert _bits_equal(value, loaded.state_dict()[key]), key
    again = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    # masks that do not match the weights are refused before anything is written
    wrong = MaskSet({n: ~m for n, m in masks.masks.items()}, masks.patterns)
    with pytest.raises(ValueError):
        save_compressed(model, tmp_path / "bad", masks=wrong)
    assert not (tmp_path / "bad").exists()


def test_load_compressed_as_sparse_warns_when_nothing_is_swapped(tmp_path, caplog, without_native):
    """On a CPU without the native kernels backend 'auto' keeps 2:4 layers dense: as_sparse=True says so (and how
    to get them swapped)."""
    from factories import tiny_llama

    model = tiny_llama(0).eval()
    _prune24(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n])
    save_compressed(model, tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        dense = load_compressed(tmp_path / "ckpt", as_sparse=True)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    assert "none of the" in caplog.text and "backend='packed24'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.compress"):
        sparse = load_compressed(tmp_path / "ckpt", as_sparse=True, backend="packed24")
    assert any(isinstance(m, SparseLinear) for m in sparse.modules()) and "none of the" not in caplog.text


def _mixed_sparse_llama(dtype: torch.dtype) -> tuple[nn.Module, list[str], list[str]]:
    """A tiny Llama in ``dtype`` whose attention linears are 2:4 and whose MLP linears are 70% unstructured;
    returns (model, 2:4 names, unstructured names)."""
    from factories import tiny_llama

    model = tiny_llama(0).to(dtype).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    two_four = [n for n in names if "self_attn" in n]
    unstructured = [n for n in names if "mlp" in n]
    _prune24(model, two_four)
    with torch.no_grad():
        for name in unstructured:
            weight = model.get_submodule(name).weight
            weight.masked_fill_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(len(name))) < 0.7, 0)
    return model, two_four, unstructured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_compressed_builds_the_sparse_linears_from_the_stored_parts(native, tmp_path, monkeypatch, dtype):
    """On a CPU with the native kernels, as_sparse=True puts the stored values / meta / bitmask in the SparseLinear
    buffers: no layer is unpacked to dense nor packed again, and every buffer and output is bit for bit what
    compress() of the dense load gives. A backend that is not the stored format still goes through the dense
    weight."""
    from vlmsparse import ops
    from vlmsparse.modules import sparse_linear as sl

    model, two_four, unstructured = _mixed_sparse_llama(dtype)
    save_compressed(model, tmp_path / "ckpt")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    want = {}
    for backend in ("auto", "bitmask"):
        reference = load_compressed(tmp_path / "ckpt")
        compress(reference, backend=backend, progress=False)
        with torch.no_grad():
            want[backend] = (dict(reference.named_buffers()), reference(ids).logits)

    unpacked, packed = [], []
    real_unpack, real_pack = ops.unpack_weight, ops.pack24_weight
    monkeypatch.setattr(ops, "unpack_weight", lambda stored: unpacked.append(stored.shape) or real_unpack(stored))
    monkeypatch.setattr(ops, "pack24_weight", lambda w: packed.append("pack24") or real_pack(w))
    real_bitmask = sl.pack_bitmask_weight
    monkeypatch.setattr(sl, "pack_bitmask_weight", lambda w: packed.append("pack_bitmask_weight") or real_bitmask(w))
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=True)
    assert unpacked == [] and packed == []
    backends = {n: m.backend for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert backends == {**dict.fromkeys(two_four, "packed24"), **dict.fromkeys(unstructured, "bitmask")}
    buffers, logits = want["auto"]
    assert dict(loaded.named_buffers()).keys() == buffers.keys()
    for key, value in loaded.named_buffers():
        assert _bits_equal(value, buffers[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)

    # the 2:4 layers as bitmask: unpacked once each, then packed in the other format; the bitmask ones direct
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=True, backend="bitmask")
    assert len(unpacked) == len(two_four) and packed == ["pack_bitmask_weight"] * len(two_four)
    assert {m.backend for m in loaded.modules() if isinstance(m, SparseLinear)} == {"bitmask"}
    buffers, logits = want["bitmask"]
    for key, value in loaded.named_buffers():
        assert _bits_equal(value, buffers[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


@pytest.mark.parametrize("as_sparse", [False, True])
def test_load_compressed_fills_every_parameter_and_keeps_ties(native, tmp_path, as_sparse):
    """The model is built with its parameters on the meta device and filled from the checkpoint: none is left
    there, a tied LM head is the embedding again, and a swapped linear holds no dense weight."""
    from factories import tiny_llama_config
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    _prune24(model, names)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=as_sparse)
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    held = {k for k, _ in loaded.named_parameters()} | {k for k, _ in loaded.named_buffers()}
    assert {f"{n}.weight" for n in names} <= held if not as_sparse else not {f"{n}.weight" for n in names} & held
    with torch.no_grad():
        got = loaded(ids).logits
    if as_sparse:
        torch.testing.assert_close(got, want)  # the packed kernel sums in another order
    else:
        assert torch.equal(got, want)


def test_save_compressed_writes_a_sparse_linear_as_it_holds_it(native, tmp_path, monkeypatch):
    """Saving a compressed model writes each SparseLinear's values / meta / bitmask as they are (no unpack, no
    repack): the same file tensors and index as saving the dense model. A bitmask layer the dense way would store
    otherwise (2:4, or under min_sparsity) goes through its dense weight."""
    from safetensors.torch import load_file

    from vlmsparse import ops
    from vlmsparse.pipeline import compress as cp

    model, two_four, unstructured = _mixed_sparse_llama(torch.bfloat16)
    save_compressed(model, tmp_path / "dense")
    compress(model, progress=False)
    model.set_submodule(two_four[0], SparseLinear(model.get_submodule(two_four[0]).dense_weight(), None, "bitmask"))
    calls = []
    real_pack, real_bitmask = ops.pack24_weight, cp.pack_bitmask
    monkeypatch.setattr(ops, "pack24_weight", lambda w: calls.append("pack24") or real_pack(w))
    monkeypatch.setattr(cp, "pack_bitmask", lambda w: calls.append("pack_bitmask") or real_bitmask(w))
    real_unpack = ops.unpack_weight
    monkeypatch.setattr(ops, "unpack_weight", lambda stored: calls.append("unpack") or real_unpack(stored))
    save_compressed(model, tmp_path / "sparse")
    assert calls == ["unpack", "pack24"]  # the 2:4 layer held as a bitmask only
    want, got = load_file(tmp_path / "dense" / cp.WEIGHTS_FILENAME), load_file(tmp_path / "sparse" / cp.WEIGHTS_FILENAME)
    assert want.keys() == got.keys()
    for key in want:
        assert _bits_equal(got[key], want[key]), key
    index = [json.loads((tmp_path / d / INDEX_FILENAME).read_text()) for d in ("dense", "sparse")]
    assert index[0]["tensors"] == index[1]["tensors"] and index[0]["size"] == index[1]["size"]
    calls.clear()
    save_compressed(model, tmp_path / "high", min_sparsity=0.9)  # the 70% layers: dense entries now
    assert sorted(calls) == ["pack24"] + ["unpack"] * (len(unstructured) + 1)
    assert {json.loads((tmp_path / "high" / INDEX_FILENAME).read_text())["tensors"][f"{n}.weight"]["format"]
            for n in unstructured} == {"dense"}


def test_compress_auto_decides_per_layer_from_timings(monkeypatch):
    """The auto decision fed fake timings: dense where the compressed path loses at a token count; with
    dense_copy a per-call threshold; the stored plan is what load_compressed applies."""
    from vlmsparse.modules import sparse_linear as sl
    from vlmsparse.pipeline import compress as cp

    monkeypatch.setattr(cp, "sparse_candidates", lambda w: {"packed24": "fake GPU"})
    monkeypatch.setattr(sl, "sparse_candidates", lambda w: {"packed24": "fake GPU"})
    fake = {(32, 32): {"dense": {1: 1.0, 4096: 10.0}, "packed24": {1: 3.0, 4096: 8.0}},  # wins only when long
            (16, 32): {"dense": {1: 1.0, 4096: 10.0}, "packed24": {1: 0.9, 4096: 9.0}}}  # wins at both
    timed = []

    def fake_time(module, names, tokens):
        timed.append(tuple(module.weight.shape))
        assert names == ["packed24"] and list(tokens) == [1, 4096]
        return fake[tuple(module.weight.shape)]

    monkeypatch.setattr(cp, "_time_candidates", fake_time)

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16))
        _prune24(m, ["0", "1", "2"])
        return m

    m = model()
    report = compress(m, auto=True, tokens=(1, 4096), progress=False)
    assert sorted(set(timed)) == [(16, 32), (32, 32)] and len(timed) == 2  # once per distinct shape
    assert [d.backend for d in report.layers] == ["dense", "dense", "packed24"]
    assert "packed24 is faster from 4096 tokens" in report.layers[0].reason
    assert (report.layers[0].dense_ms, report.layers[0].sparse_ms) == (11.0, 11.0)
    assert report.layers[2].dense_below == 0 and isinstance(m[2], SparseLinear)
    m = model()
    x = torch.randn(3, 32)
    want = m(x)
    report = compress(m, auto=True, tokens=(1, 4096), dense_copy=True, progress=False)
    assert [(d.backend, d.dense_below) for d in report.layers] == [("packed24", 4096)] * 2 + [("packed24", 0)]
    assert report.layers[0].sparse_ms == 9.0 and m[0].dense_below == 4096
    from vlmsparse import ops

    with ops.use_backend("reference"):  # unpack + F.linear: bit for bit what nn.Linear gives
        assert torch.equal(m(x), want)


def test_load_compressed_applies_the_stored_plan(monkeypatch, tmp_path):
    from factories import tiny_llama

    from vlmsparse.pipeline import compress as cp

    monkeypatch.setattr(cp, "sparse_candidates", lambda w: {"packed24": "fake GPU"})
    monkeypatch.setattr(cp, "_time_candidates", lambda module, names, tokens: {
        "dense": {1: 1.0, 4096: 10.0}, "packed24": {1: 3.0, 4096: 8.0}})
    model = tiny_llama(0).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    _prune24(model, names)
    report = compress(model, auto=True, tokens=(1, 4096), dense_copy=True, progress=False)
    assert {(d.backend, d.dense_below) for d in report.layers} == {("packed24", 4096)}
    decompress(model)
    save_compressed(model, tmp_path / "ckpt", plan=report)
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=True)
    assert {(loaded.get_submodule(n).backend, loaded.get_submodule(n).dense_below) for n in names} == {
        ("packed24", 4096)}
    # a device without the fast path (no GPU kernel, no native CPU kernel): the plan is not applied
    from vlmsparse.modules import sparse_linear as sl

    monkeypatch.setattr(cp, "sparse_candidates", lambda w: {})
    monkeypatch.setattr(sl, "native_cpu_support", lambda w: (False, "no native kernel (simulated)"))
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=True)
    assert not any(isinstance(mod, SparseLinear) for mod in loaded.modules())
