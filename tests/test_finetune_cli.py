"""``vlmsparse finetune`` on a pruned model folder: a run, the errors a user meets, resume."""

from __future__ import annotations

import importlib
import json

from factories import pruned_tiny, synthetic_processor
from PIL import Image

from vlmsparse.cli import main
from vlmsparse.masks import MaskSet
from vlmsparse.pipeline.save import load_pruned, save_pruned

ARGS = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--logging-steps", "1"]


def test_cli_finetune_on_a_pruned_folder(tmp_path, capsys):
    model, masks = pruned_tiny("llava", "2:4")
    folder = save_pruned(model, masks, tmp_path / "pruned", processor=synthetic_processor("llava"))
    for color, name in [((255, 0, 0), "a.png"), ((0, 0, 255), "b.png")]:
        Image.new("RGB", (32, 32), color).save(tmp_path / name)
    rows = [{"image": n, "conversations": [{"from": "human", "value": "<image>\nwhat color is the object?"},
                                          {"from": "gpt", "value": c}]} for n, c in [("a.png", "red"), ("b.png", "blue")]]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    capsys.readouterr()  # what saving the folder wrote
    code = main(["finetune", str(folder), "--data", str(tmp_path / "train.json"), "-o", str(out), "--save-steps", "1",
                 "--json", *ARGS])
    assert code == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err  # transformers' bars
    assert record["steps"] == 2 and record["num_examples"] == 2 and record["mask_check"]["ok"]
    assert record["config"]["rank_language"] == 8 and record["config"]["rank_vision"] == 4
    merged, merged_masks = load_pruned(out / "merged")  # checks the weights against the masks
    assert all(merged_masks[n].equal(masks[n]) for n in masks)
    # resuming with another config is refused; resuming with the same one continues from the last checkpoint
    assert main(["finetune", str(folder), "--data", str(tmp_path / "train.json"), "-o", str(out), "--resume",
                 "--method", "lora", *ARGS]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["finetune", str(folder), "--data", str(tmp_path / "train.json"), "-o", str(out), "--resume",
                 "--save-steps", "1", *ARGS]) == 0
    assert "masks kept: True" in capsys.readouterr().out


def test_cli_folder_without_masks(tmp_path, capsys):
    model, _ = pruned_tiny("llava")
    model.save_pretrained(tmp_path / "plain")
    synthetic_processor("llava").save_pretrained(tmp_path / "plain")
    out = tmp_path / "out"
    assert main(["finetune", str(tmp_path / "plain"), "--data", "synthetic:4", "-o", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "must be pruned first" in err and "pass masks_from_zeros=True (--masks-from-zeros) to take" in err
    assert main(["finetune", str(tmp_path / "plain"), "--data", "synthetic:4", "-o", str(out), "--masks-from-zeros",
                 "--method", "full", *ARGS]) == 0
    assert "masks kept: True" in capsys.readouterr().out
    assert abs(MaskSet.load(out / "merged").sparsity() - 0.5) < 1e-6
    # a data file that does not parse: exit 2 naming the line
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "caption": "a"}\n{oops\n')
    assert main(["finetune", str(tmp_path / "plain"), "--data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o2"),
                 "--masks-from-zeros", *ARGS]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_cli_self_distillation_from_a_folder_with_dense_weights(tmp_path, capsys):
    """A folder holding the dense weights beside its masks: the student is masked, the teacher dense."""
    model, masks = pruned_tiny("llava", keep_dense=True)
    model.save_pretrained(tmp_path / "dense")
    masks.save(tmp_path / "dense")
    synthetic_processor("llava").save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    assert main(["finetune", str(tmp_path / "dense"), "--data", "synthetic:4", "-o", str(out), "--distill", "0.2",
                 "--teacher", "self", "--json", *ARGS]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["teacher"] == "self" and all(e["kl"] > 0 for e in record["losses"])
    assert record["sparsity_before"]["all"] == 0.5 and record["mask_check"]["ok"]
    load_pruned(out / "merged")  # the merged model is pruned (zeros where the masks prune)
    # without distillation the same folder is refused: its weights are not zero where the masks prune
    assert main(["finetune", str(tmp_path / "dense"), "--data", "synthetic:4", "-o", str(tmp_path / "o2"), *ARGS]) == 2
    assert "non-zero at positions its mask prunes" in capsys.readouterr().err


def test_cli_distill_teacher_and_data_errors(tmp_path, capsys):
    """--distill needs --teacher (no vlmsparse prune output keeps the dense weights 'self' needs), --teacher needs
    --distill (FinetuneConfig's check, named by parameter); a 'self' teacher on a pruned folder and a bad
    synthetic:N are refused in CLI wording."""
    model, masks = pruned_tiny("llava", "2:4")
    folder = save_pruned(model, masks, tmp_path / "pruned", processor=synthetic_processor("llava"))
    base = ["finetune", str(folder), "--data", "synthetic:4", "-o", str(tmp_path / "out"), *ARGS]
    assert main([*base, "--distill", "0.2"]) == 2
    assert "--distill needs --teacher: the dense model folder" in capsys.readouterr().err
    assert main([*base, "--teacher", str(tmp_path)]) == 2
    assert "given but distill_lambda=0: set distill_lambda > 0 to distil" in capsys.readouterr().err
    assert main([*base, "--distill", "0.2", "--teacher", "self"]) == 2
    err = capsys.readouterr().err
    assert "(--teacher self)" in err and "(--teacher DENSE_FOLDER)" in err
    for spec in ("synthetic:abc", "synthetic:0"):
        assert main(["finetune", str(folder), "--data", spec, "-o", str(tmp_path / "out"), *ARGS]) == 2
        assert f"data {spec!r}: synthetic:N needs an integer N >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _pruned_llama_folder(tmp_path, pattern="2:4"):
    """A tiny Llama with magnitude-pruned language linears, saved with the word-level tokenizer."""
    from factories import magnitude_pruned, tiny_llama

    from vlmsparse.data.vocab import build_tokenizer

    model = tiny_llama(seed=2)
    masks = magnitude_pruned(model, pattern, ("language",))
    return save_pruned(model, masks, tmp_path / "llama", processor=build_tokenizer()), masks


def test_cli_finetune_a_language_model_alone(tmp_path, capsys):
    """A pruned Llama folder (tokenizer as its processor) finetunes with SparseLoRA on text-only conversation
    rows: the loss goes down, every pruned weight stays zero; image data is refused."""
    from transformers import LlamaForCausalLM

    folder, masks = _pruned_llama_folder(tmp_path)
    rows = [{"conversations": [{"from": "human", "value": "what color is the circle?"}, {"from": "gpt", "value": "red"}]},
            {"image": None, "conversations": [{"from": "human", "value": "how many shapes?"},
                                              {"from": "gpt", "value": "two"}]}]
    (tmp_path / "text.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    args = ["--max-steps", "8", "--batch-size", "2", "--lr", "2e-2", "--no-progress", "--logging-steps", "1"]
    assert main(["finetune", str(folder), "--data", str(tmp_path / "text.json"), "-o", str(out), "--method",
                 "sparselora", "--json", *args]) == 0
    record = json.loads(capsys.readouterr().out)
    losses = [e["loss"] for e in record["losses"]]
    assert record["steps"] == 8 and record["num_examples"] == 2 and len(losses) == 8
    assert losses[-1] < 0.9 * losses[0], losses
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == 0.5
    assert record["trainable_parameters"] > 0 and record["config"]["method"] == "sparselora"
    merged, merged_masks = load_pruned(out / "merged")  # checks the weights against the masks
    assert isinstance(merged, LlamaForCausalLM)
    assert set(merged_masks) == set(masks) and all(merged_masks[n].equal(masks[n]) for n in masks)
    original = LlamaForCausalLM.from_pretrained(folder).state_dict()
    name = next(iter(masks)) + ".weight"
    assert not merged.state_dict()[name].equal(original[name])  # the adapters were merged in
    assert (out / "merged" / "tokenizer.json").is_file()  # the tokenizer travels with the merged model
    # image data for a language model alone: the synthetic set and rows with images are refused
    assert main(["finetune", str(folder), "--data", "synthetic:4", "-o", str(tmp_path / "o2"), *ARGS]) == 2
    assert "synthetic data set is image-text, but" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    rows.append({"image": "x.png", "conversations": rows[0]["conversations"]})
    (tmp_path / "with_image.json").write_text(json.dumps(rows, indent=1))
    assert main(["finetune", str(folder), "--data", str(tmp_path / "with_image.json"), "-o", str(tmp_path / "o3"),
                 *ARGS]) == 2
    assert "(row 2): the example has an image, but the processor is a tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_cli_finetune_destroys_the_launchers_process_group(tmp_path, monkeypatch, capsys):
    """Under a launcher the command ends by destroying the process group (torch asks it of a script)."""
    import torch.distributed as dist
    from torch.distributed import HashStore

    finetune_module = importlib.import_module("vlmsparse.training.finetune")  # the module, not the function

    def fake_finetune(*args, **kwargs):  # the run itself is tested above; here only what follows it
        assert dist.is_initialized()
        return {"steps": 0}

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        assert main(["finetune", str(tmp_path), "--data", "synthetic:2", "-o", str(tmp_path / "out"), "--json"]) == 0
        assert not dist.is_initialized()
        assert json.loads(capsys.readouterr().out) == {"steps": 0}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cli_packed_base_flag_reaches_the_config(tmp_path, monkeypatch, capsys):
    finetune_module = importlib.import_module("vlmsparse.training.finetune")
    seen = []
    monkeypatch.setattr(finetune_module, "finetune", lambda model, data, out, config, **kw: seen.append(config) or {})
    for flags in ([], ["--packed-base"]):
        assert main(["finetune", str(tmp_path), "--data", "synthetic:2", "-o", str(tmp_path / "out"), "--json",
                     *flags]) == 0
    assert [c.packed_base for c in seen] == [False, True]
    assert main(["finetune", str(tmp_path), "--data", "synthetic:2", "-o", str(tmp_path / "out"), "--packed-base",
                 "--method", "lora"]) == 2
    assert "packed_base=True needs method='sparselora'" in capsys.readouterr().err
