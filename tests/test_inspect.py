"""`vlmsparse inspect` on tiny saved models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import tiny_llava

from vlmsparse.cli import main
from vlmsparse.masks import MaskSet
from vlmsparse.pipeline.inspect import inspect_checkpoint
from vlmsparse.sparsity import mask_nm, mask_per_row

# Rows are named by module, as the masks are, although transformers 5 saves LLaVA under its legacy keys
# (language_model.model.layers.0.self_attn.q_proj.weight, vision_tower.encoder.layers.1.mlp.fc1.weight).
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"
FC1 = "model.vision_tower.encoder.layers.1.mlp.fc1"


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A tiny LLaVA with one language linear at 2:4 and one vision linear at 70%, saved with its masks."""
    model = tiny_llava()
    modules = dict(model.named_modules())
    q, fc1 = modules[Q_PROJ].weight, modules[FC1].weight
    with torch.no_grad():
        q_mask = mask_nm(q.abs(), 2, 4)
        fc1_mask = mask_per_row(fc1.abs(), 0.7)
        q.copy_(torch.where(q_mask, q, 0.0))
        fc1.copy_(torch.where(fc1_mask, fc1, 0.0))
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    # The FC1 mask deliberately disagrees with its weight in one kept-out position.
    wrong = fc1_mask.clone()
    wrong[0, fc1_mask[0].nonzero()[0, 0]] = False
    MaskSet({Q_PROJ: q_mask, FC1: wrong}, {Q_PROJ: "2:4", FC1: "0.7"}, "magnitude").save(folder)
    return folder


def test_report_rows_and_totals(saved_llava):
    report = inspect_checkpoint(saved_llava)
    rows = {r.name: r for r in report.rows}
    assert report.model_type == "llava"
    q = rows[Q_PROJ]
    assert q.nm == "2:4" and q.sparsity == pytest.approx(0.5) and q.shape == (32, 32)
    assert q.inside_mask is True
    fc1 = rows[FC1]
    assert fc1.sparsity == pytest.approx(22 / 32)  # round(32 * 0.7) = 22 pruned per row
    assert fc1.nm is None and fc1.inside_mask is False
    assert rows["lm_head"].inside_mask is None
    assert not any("embed" in name for name in rows)  # embeddings are not linear layers
    totals = report.totals()
    assert totals["all"]["zeros"] == sum(r.zeros for r in report.rows)
    assert totals["all"]["layers"] == len(report.rows)


def test_report_parts_when_architecture_known(saved_llava):
    rows = {r.name: r for r in inspect_checkpoint(saved_llava).rows}
    assert rows[Q_PROJ].part == "language"
    assert rows[FC1].part == "vision"
    assert rows["model.multi_modal_projector.linear_1"].part == "connector"
    totals = inspect_checkpoint(saved_llava).totals()
    assert {"language", "vision", "connector"} <= set(totals)


def test_all_flag_includes_embeddings(saved_llava):
    names = [r.name for r in inspect_checkpoint(saved_llava, linear_only=False).rows]
    assert "model.language_model.embed_tokens" in names


def test_cli_json_and_table(saved_llava, capsys):
    assert main(["inspect", str(saved_llava), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layer = next(x for x in data["layers"] if x["name"] == Q_PROJ)
    assert layer["nm"] == "2:4" and layer["shape"] == [32, 32]
    assert main(["inspect", str(saved_llava / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "2:4" in out and "50.00%" in out


def test_cli_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "weights.bin").write_bytes(b"")
    assert main(["inspect", str(tmp_path / "weights.bin")]) == 2
    assert "expected a .safetensors file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err


def test_entry_points_list_subcommands():
    """Both entry points (the console script and ``python -m vlmsparse``) run the CLI and list every subcommand."""
    from vlmsparse.cli import _COMMANDS

    names = [name for name, _add, _run in _COMMANDS]
    assert {"prune", "finetune", "eval", "compress", "inspect", "demo"} <= set(names)
    script = Path(sys.executable).with_name("vlmsparse")
    for cmd in ([sys.executable, "-m", "vlmsparse", "--help"], [str(script), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        listed = re.findall(r"^    (\S+)", out, re.MULTILINE)
        assert listed == names, out


def test_import_is_light():
    code = (
        "import sys, vlmsparse; vlmsparse.parse_pattern('2:4');"
        "heavy = [m for m in ('transformers', 'triton', 'peft') if m in sys.modules];"
        "print(heavy); assert not heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compressed_folder_reads_like_the_dense_one(saved_llava, tmp_path):
    """A compressed folder (packed 2:4 + bitmask) is decoded tensor by tensor: the same rows as the HF folder
    it was written from (names, zeros, N:M, mask checks), and load_model gives the same weights."""
    from vlmsparse.pipeline.compress import save_compressed
    from vlmsparse.pipeline.save import load_model

    model = load_model(saved_llava)
    out = tmp_path / "compressed"
    save_compressed(model, out)
    (out / "sparsity_masks.safetensors").write_bytes((saved_llava / "sparsity_masks.safetensors").read_bytes())
    index = json.loads((out / "vlmsparse_compressed.json").read_text())
    assert {e["format"] for e in index["tensors"].values()} >= {"packed24", "bitmask", "dense"}
    dense, compressed = inspect_checkpoint(saved_llava), inspect_checkpoint(out)
    # both named by module although the HF folder holds transformers 5's legacy keys: the same rows
    dense_rows = {r.name: vars(r) for r in dense.rows}
    assert {r.name: vars(r) for r in compressed.rows} == dense_rows and len(dense_rows) == len(compressed.rows)
    by_name = {r.name: r for r in compressed.rows}
    assert by_name[Q_PROJ].nm == "2:4" and by_name[FC1].inside_mask is False
    reloaded = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_masks_file_or_a_file_without_weights_is_refused(saved_llava, tmp_path, capsys):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="holds pruning masks, not weights"):
        inspect_checkpoint(saved_llava / "sparsity_masks.safetensors")
    save_file({"scale": torch.ones(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"no linear weight found in .*other.safetensors \(linear_only=False "
                       r"\(--all\) also reports embeddings and other 2-D weights\)"):
        inspect_checkpoint(tmp_path / "other.safetensors")
    assert main(["inspect", str(saved_llava / "sparsity_masks.safetensors")]) == 2
    assert "holds pruning masks" in capsys.readouterr().err


def test_rows_are_named_like_the_loaded_modules_the_masks_and_the_prune_report(tmp_path):
    """transformers 5 stores a LLaVA under legacy keys; inspect names every row by the module of the model
    load_pruned gives back, the name the masks file and the prune report use."""
    from safetensors import safe_open
    from torch import nn

    from vlmsparse.pipeline.prune import prune_model, report_of
    from vlmsparse.pipeline.save import load_pruned, save_pruned

    model = tiny_llava()
    masks = prune_model(model, method="magnitude", sparsity=0.5, progress=False)
    folder = save_pruned(model, masks, tmp_path / "pruned")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in set(f.keys())  # legacy layout on disk
    loaded, saved_masks = load_pruned(folder)
    linears = {name for name, module in loaded.named_modules() if isinstance(module, nn.Linear)}
    rows = inspect_checkpoint(folder).rows
    assert sorted(r.name for r in rows) == sorted(linears)
    checked = sorted(r.name for r in rows if r.inside_mask is not None)
    assert checked == sorted(saved_masks) == sorted(r.name for r in report_of(saved_masks)) and checked
    assert all(r.inside_mask for r in rows if r.inside_mask is not None)
    assert {r.name: r.part for r in rows if r.name in masks} == {r.name: r.part for r in report_of(masks)}


@pytest.mark.parametrize("family", ["blip2", "instructblip", "blip2_t5", "llama"])
def test_rows_are_module_names_for_every_family(tmp_path, family):
    import factories
    from torch import nn

    from vlmsparse.models import prunable_linear_names
    from vlmsparse.pipeline.save import load_model

    getattr(factories, f"tiny_{family}")().save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    linears = {name for name, module in loaded.named_modules() if isinstance(module, nn.Linear)}
    names = [r.name for r in inspect_checkpoint(tmp_path).rows]
    assert len(names) == len(set(names)) and set(names) <= linears
    assert set(prunable_linear_names(loaded)) <= set(names)
