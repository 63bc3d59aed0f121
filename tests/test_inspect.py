"""`vlmsparse inspect` on tiny saved models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import tiny_llava

from vlmsparse.cli import main
from vlmsparse.masks import MaskSet
from vlmsparse.pipeline.inspect import _canonical, inspect_checkpoint
from vlmsparse.sparsity import mask_nm, mask_per_row

Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"
FC1 = "model.vision_tower.encoder.layers.1.mlp.fc1"
# transformers 5 saves LLaVA under its legacy checkpoint keys; masks use the module names above.
Q_KEY = "language_model.model.layers.0.self_attn.q_proj.weight"
FC1_KEY = "vision_tower.encoder.layers.1.mlp.fc1.weight"


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
    q = rows[Q_KEY]
    assert q.nm == "2:4" and q.sparsity == pytest.approx(0.5) and q.shape == (32, 32)
    assert q.inside_mask is True
    fc1 = rows[FC1_KEY]
    assert fc1.sparsity == pytest.approx(22 / 32)  # round(32 * 0.7) = 22 pruned per row
    assert fc1.nm is None and fc1.inside_mask is False
    assert rows["language_model.lm_head.weight"].inside_mask is None
    assert not any("embed" in name for name in rows)  # embeddings are not linear layers
    totals = report.totals()
    assert totals["all"]["zeros"] == sum(r.zeros for r in report.rows)
    assert totals["all"]["layers"] == len(report.rows)


def test_report_parts_when_architecture_known(saved_llava):
    rows = {r.name: r for r in inspect_checkpoint(saved_llava).rows}
    assert rows[Q_KEY].part == "language"
    assert rows[FC1_KEY].part == "vision"
    assert rows["multi_modal_projector.linear_1.weight"].part == "connector"
    totals = inspect_checkpoint(saved_llava).totals()
    assert {"language", "vision", "connector"} <= set(totals)


def test_all_flag_includes_embeddings(saved_llava):
    names = [r.name for r in inspect_checkpoint(saved_llava, linear_only=False).rows]
    assert "language_model.model.embed_tokens.weight" in names


def test_cli_json_and_table(saved_llava, capsys):
    assert main(["inspect", str(saved_llava), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layer = next(x for x in data["layers"] if x["name"] == Q_KEY)
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
    for cmd in (["-m", "vlmsparse", "--help"],):
        out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=True).stdout
        assert "inspect" in out


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
    # the HF folder holds transformers 5's legacy keys (language_model.lm_head too), the compressed one the
    # module names: compare canonically

    def key(name):
        return _canonical(name).removeprefix("language_model.")

    by_name = {key(r.name): r for r in compressed.rows}
    assert set(by_name) == {key(r.name) for r in dense.rows} and len(by_name) == len(compressed.rows)
    for row in dense.rows:
        assert {**vars(by_name[key(row.name)]), "name": row.name} == vars(row), row.name
    assert by_name[key(Q_KEY)].nm == "2:4" and by_name[key(FC1_KEY)].inside_mask is False
    reloaded = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_masks_file_or_a_file_without_weights_is_refused(saved_llava, tmp_path, capsys):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="holds pruning masks, not weights"):
        inspect_checkpoint(saved_llava / "sparsity_masks.safetensors")
    save_file({"scale": torch.ones(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no linear weight found"):
        inspect_checkpoint(tmp_path / "other.safetensors")
    assert main(["inspect", str(saved_llava / "sparsity_masks.safetensors")]) == 2
    assert "holds pruning masks" in capsys.readouterr().err
