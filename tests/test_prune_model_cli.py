"""Calibration sets from files / folders / the synthetic generator, and ``vlmsparse prune`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from factories import _vision, tiny_llama_config
from PIL import Image

from vlmsparse.cli import main
from vlmsparse.data.calibration import build_calibration_batches, load_calibration_samples
from vlmsparse.masks import MaskSet
from vlmsparse.models import prunable_linear_names
from vlmsparse.pipeline.save import load_pruned


@pytest.fixture(scope="module")
def processor():
    from vlmsparse.data.vocab import build_processor

    return build_processor(image_size=32, patch_size=8)


@pytest.fixture
def llava_folder(tmp_path, processor):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    text = tiny_llama_config()
    text.vocab_size = len(tokenizer)
    text.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision()),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path / "llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(folder / f"img{i}.png")


def test_json_jsonl_llava_conversations_and_folder(tmp_path, processor):
    _images(tmp_path / "imgs", 3)
    records = [
        {"image": "imgs/img0.png", "caption": "a red circle"},
        {"image": "imgs/img1.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                      {"from": "gpt", "value": "a blue square"}]},
        {"image_path": "imgs/img2.png", "text": "two shapes"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("data.json", "data.jsonl"):
        samples = load_calibration_samples(tmp_path / name, nsamples=10)
        assert [s.text for s in samples] == ["a red circle", "what is it? a blue square", "two shapes"]
        assert all(s.image.size == (40, 30) for s in samples)
    assert len(load_calibration_samples(tmp_path / "data.json", nsamples=2, seed=1)) == 2
    # a folder with sidecar captions
    for i in range(3):
        (tmp_path / "imgs" / f"img{i}.txt").write_text(f"caption {i}")
    samples = load_calibration_samples(tmp_path / "imgs")
    assert [s.text for s in samples] == ["caption 0", "caption 1", "caption 2"]
    batches = build_calibration_batches(samples, processor, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for b in batches:
        assert ((b["input_ids"] == image_id).sum(dim=1) == 16).all()  # one token per patch
        assert b["pixel_values"].shape[1:] == (3, 32, 32)


def test_bad_calibration_sources(tmp_path):
    _images(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "data.json").write_text(json.dumps([{"image": "broken.png", "text": "x"}]))
    with pytest.raises(ValueError, match="broken.png"):
        load_calibration_samples(tmp_path / "data.json")
    (tmp_path / "missing.json").write_text(json.dumps([{"image": "nope.png", "text": "x"}]))
    with pytest.raises(ValueError, match="nope.png.*does not exist"):
        load_calibration_samples(tmp_path / "missing.json")
    (tmp_path / "notext.json").write_text(json.dumps([{"image": "img0.png"}]))
    with pytest.raises(ValueError, match="no text"):
        load_calibration_samples(tmp_path / "notext.json")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no samples"):
        load_calibration_samples(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_calibration_samples(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="no caption"):
        load_calibration_samples(tmp_path)


@pytest.mark.slow
def test_cli_prune_end_to_end(tmp_path, llava_folder, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(llava_folder), str(out), "--method", "sparsegpt", "--vision", "2:4", "--language",
                 "0.6", "--calibration", "synthetic", "--nsamples", "4", "--batch-size", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "sparsegpt" and len(report["layers"]) == 26
    assert report["error_over"] == "every calibration token"  # SparseGPT's Hessian: the error over all of them
    model, masks = load_pruned(out)
    assert list(masks) == prunable_linear_names(model)
    assert {masks.patterns[n] for n in prunable_linear_names(model, parts="vision")} == {"2:4"}
    assert {masks.patterns[n] for n in prunable_linear_names(model, parts="language")} == {"0.6"}
    assert (out / "tokenizer_config.json").exists() or (out / "tokenizer.json").exists()
    assert MaskSet.load(out).method == "sparsegpt"
    # never the input folder; an existing output needs --overwrite
    assert main(["prune", str(llava_folder), str(llava_folder), "--method", "magnitude"]) == 2
    assert main(["prune", str(llava_folder), str(out), "--method", "magnitude", "--quiet"]) == 2
    assert main(["prune", str(llava_folder), str(out), "--method", "magnitude", "--quiet", "--overwrite"]) == 0
    assert "already exists" in capsys.readouterr().err
    # bad sparsity: a clear error, exit code 2
    assert main(["prune", str(llava_folder), str(tmp_path / "x"), "--sparsity", "4:4", "--quiet"]) == 2


def test_cli_prune_blip2_flan_t5_with_decoder_calibration(tmp_path):
    """An encoder-decoder language model: calibration batches carry the text on the decoder side too (start +
    tokens + EOS), prune_model refuses batches without it, and ``vlmsparse prune`` runs end to end."""
    from factories import synthetic_processor, tiny_blip2_t5

    from vlmsparse.pipeline.prune import prune_model

    blip = synthetic_processor("blip2")
    tok = blip.tokenizer
    samples = load_calibration_samples("synthetic", nsamples=3, seed=0, image_size=32)
    batches = build_calibration_batches(samples, blip, batch_size=3, decoder_start_token_id=0)
    batch = batches[0]
    for row, sample in enumerate(samples):
        words = tok(sample.text, add_special_tokens=False)["input_ids"]
        n = len(words) + 2
        assert batch["decoder_input_ids"][row, :n].tolist() == [0, *words, tok.eos_token_id]
        assert batch["decoder_attention_mask"][row].tolist() == [1] * n + [0] * (batch["decoder_input_ids"].shape[1] - n)
    plain = build_calibration_batches(samples, blip, batch_size=3)
    assert "decoder_input_ids" not in plain[0]
    assert all(torch.equal(plain[0][k], v) for k, v in batch.items() if not k.startswith("decoder_"))

    model = tiny_blip2_t5()
    model.config.image_token_index = tok.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        prune_model(model, method="wanda", sparsity="0.5", calibration=plain)

    folder = tmp_path / "t5"
    model.save_pretrained(folder)
    blip.save_pretrained(folder)
    assert main(["prune", str(folder), str(tmp_path / "out"), "--method", "wanda", "--sparsity", "2:4",
                 "--calibration", "synthetic", "--nsamples", "4", "--quiet"]) == 0
    pruned, masks = load_pruned(tmp_path / "out")
    decoder = [n for n in masks if ".decoder." in n]
    assert decoder and all(masks.patterns[n] == "2:4" for n in masks)
    assert masks.sparsity() == pytest.approx(0.5)


# ---------------------------------------------------------------------- per-part flags on top of --allocation
@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    from factories import save_blip2_folder, tiny_blip2

    return save_blip2_folder(tmp_path_factory.mktemp("blip2") / "blip2", tiny_blip2())


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], {"vision": "0.5", "language": "0.5"}),
        (["--sparsity", "2:4", "--connector", "0.5"], {"vision": "2:4", "language": "2:4", "connector": "0.5"}),
        (["--vision", "2:4", "--language", "0.6"], {"vision": "2:4", "language": "0.6"}),
        (["--sparsity", "2:4", "--vision", "0"], {"language": "2:4"}),
        (["--allocation", "language", "--sparsity", "4:8"], {"language": "4:8"}),
        (["--allocation", "language", "--sparsity", "0.6", "--vision", "2:4"], {"language": "0.6", "vision": "2:4"}),
        (["--allocation", "vision", "--sparsity", "2:4", "--connector", "0.7"], {"vision": "2:4", "connector": "0.7"}),
    ],
)
def test_cli_part_flags_start_from_allocation_and_sparsity(tmp_path, blip2_folder, flags, expected):
    """--vision / --language / --connector set or add one part's pattern; the other parts keep --allocation at
    --sparsity: the masks cover exactly the expected parts, each with its pattern."""
    out = tmp_path / "out"
    assert main(["prune", str(blip2_folder), str(out), "--method", "magnitude", "--quiet", *flags]) == 0
    model, masks = load_pruned(out)
    names = {part: prunable_linear_names(model, parts=part, include_non_default=True)
             for part in ("vision", "connector", "language")}
    assert all(names.values())
    assert set(masks) == {n for part in expected for n in names[part]}
    for part, pattern in expected.items():
        assert {masks.patterns[n] for n in names[part]} == {pattern}


def test_cli_part_flags_on_a_language_model_and_owl(tmp_path, blip2_folder, capsys):
    from factories import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["prune", str(tmp_path / "llama"), str(tmp_path / "out"), "--method", "magnitude", "--quiet",
                 "--sparsity", "2:4", "--language", "0.7"]) == 0
    model, masks = load_pruned(tmp_path / "out")
    assert list(masks) == prunable_linear_names(model) and set(masks.patterns.values()) == {"0.7"}
    assert main(["prune", str(blip2_folder), str(tmp_path / "owl"), "--allocation", "owl", "--connector", "0.5"]) == 2
    assert "allocation 'owl' cannot be combined with vision / language / connector" in capsys.readouterr().err
    assert not (tmp_path / "owl").exists()


def test_check_device_names_the_option(monkeypatch):
    from vlmsparse.pipeline.guards import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device 'warp-drive' is not a device name; allowed: cpu, cuda, cuda:N"):
        check_device("warp-drive", option="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device(None) == "cpu"
    with pytest.raises(ValueError, match="device cuda:1: CUDA is not available on this machine; use device cpu"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device(None) == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        check_device("cuda:2")


def test_cli_prune_checks_before_loading(tmp_path, blip2_folder, monkeypatch, capsys):
    """A bad output folder, --device, --max-words or a folder without weights is refused before any model is
    loaded or pruned, with CLI wording."""
    import vlmsparse.pipeline.save as save

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(save, "load_model", no_load)
    (tmp_path / "exists").mkdir()
    assert main(["prune", str(blip2_folder), str(tmp_path / "exists"), "--method", "magnitude"]) == 2
    assert "already exists; choose another folder or pass overwrite=True (--overwrite)" in capsys.readouterr().err
    for inside in (blip2_folder, blip2_folder / "pruned", blip2_folder.parent):
        assert main(["prune", str(blip2_folder), str(inside), "--method", "magnitude", "--overwrite"]) == 2
        assert "choose a folder outside the input" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["prune", str(blip2_folder), str(tmp_path / "a"), "--device", "cuda"]) == 2
    assert "device cuda: CUDA is not available" in capsys.readouterr().err
    assert main(["compress", str(blip2_folder), "-o", str(tmp_path / "c"), "--auto", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert main(["prune", str(blip2_folder), str(tmp_path / "a"), "--max-words", "0"]) == 2
    assert "max_words must be >= 1" in capsys.readouterr().err
    assert main(["prune", str(blip2_folder), str(tmp_path / "a"), "--method", "sparsegpt", "--scope", "row"]) == 2
    assert "scope" in (err := capsys.readouterr().err) and "sparsegpt" in err and "allowed: auto" in err
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((blip2_folder / "config.json").read_text())
    assert main(["prune", str(tmp_path / "noweights"), str(tmp_path / "a")]) == 2
    assert "holds config.json but no model weights (model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_cli_text_calibration_cannot_calibrate_a_vision_part(tmp_path, llava_folder, capsys):
    (tmp_path / "corpus.txt").write_text(" ".join(["a red circle"] * 200))
    out = tmp_path / "pruned"
    assert main(["prune", str(llava_folder), str(out), "--calibration", str(tmp_path / "corpus.txt"),
                 "--seqlen", "16", "--nsamples", "2", "--quiet"]) == 2
    assert "cannot calibrate the vision part" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(llava_folder), str(out), "--allocation", "language", "--calibration",
                 str(tmp_path / "corpus.txt"), "--seqlen", "16", "--nsamples", "2", "--quiet"]) == 0
    _, masks = load_pruned(out)
    assert list(masks) == prunable_linear_names(load_pruned(out)[0], parts="language")


@pytest.mark.parametrize("flags", [["--allocation", "equal", "--vision", "0"], ["--sparsity", "2:4", "--vision", "0"],
                                   ["--vision", "0", "--connector", "0"]])
def test_cli_text_calibration_with_the_vision_part_left_dense(tmp_path, llava_folder, flags):
    """Issue 15: a vision part at pattern 0 stays dense and needs no images, so a text source calibrates the rest
    (the language part alone); the same for a connector at 0. The vision and connector weights stay unchanged."""
    from vlmsparse.pipeline.save import load_model

    (tmp_path / "corpus.txt").write_text(" ".join(["a red circle"] * 200))
    out = tmp_path / "pruned"
    assert main(["prune", str(llava_folder), str(out), "--calibration", str(tmp_path / "corpus.txt"),
                 "--seqlen", "16", "--nsamples", "2", "--quiet", *flags]) == 0
    model, masks = load_pruned(out)
    assert set(masks) == set(prunable_linear_names(model, parts="language")) and masks.sparsity() > 0
    before, after = dict(load_model(llava_folder).named_parameters()), dict(model.named_parameters())
    dense = prunable_linear_names(model, parts=("vision", "connector"), include_non_default=True)
    assert dense and all(torch.equal(before[f"{n}.weight"], after[f"{n}.weight"]) for n in dense)


def test_cli_text_calibration_cannot_calibrate_a_pruned_connector(tmp_path, llava_folder, capsys):
    (tmp_path / "corpus.txt").write_text(" ".join(["a red circle"] * 200))
    out = tmp_path / "pruned"
    assert main(["prune", str(llava_folder), str(out), "--allocation", "language", "--connector", "0.5",
                 "--calibration", str(tmp_path / "corpus.txt"), "--seqlen", "16", "--nsamples", "2", "--quiet"]) == 2
    assert "cannot calibrate the connector part" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flags", [["--allocation", "language"], ["--vision", "0"]])
def test_cli_text_calibration_of_a_blip2_language_part(tmp_path, blip2_folder, flags, capsys):
    """BLIP-2's forward needs pixel_values: a text source calibrates its language part (the language model run
    alone) instead of failing on the missing images; pruning its vision part from text is refused before loading."""
    from vlmsparse.pipeline.save import load_model

    (tmp_path / "corpus.txt").write_text(" ".join(["a red circle"] * 200))
    out = tmp_path / "pruned"
    assert main(["prune", str(blip2_folder), str(out), "--sparsity", "2:4", "--calibration",
                 str(tmp_path / "corpus.txt"), "--seqlen", "16", "--nsamples", "2", "--quiet", *flags]) == 0
    model, masks = load_pruned(out)
    language = prunable_linear_names(model, parts="language")
    assert list(masks) == language and all(masks[n].float().mean() == 0.5 for n in language)
    before, after = dict(load_model(blip2_folder).named_parameters()), dict(model.named_parameters())
    dense = [k for k in before if not k.startswith("language_model.")]
    assert dense and all(torch.equal(before[k], after[k]) for k in dense)
    assert main(["prune", str(blip2_folder), str(tmp_path / "x"), "--calibration", str(tmp_path / "corpus.txt"),
                 "--seqlen", "16", "--nsamples", "2", "--quiet"]) == 2
    assert "cannot calibrate the vision part" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_propagate_reaches_prune_model(tmp_path, llava_folder, monkeypatch):
    from vlmsparse.pipeline import prune as prune_package

    seen, real = [], prune_package.prune_model
    monkeypatch.setattr(prune_package, "prune_model", lambda *a, **k: seen.append(k["propagate"]) or real(*a, **k))
    flags = ["--method", "wanda", "--nsamples", "2", "--batch-size", "2", "--quiet"]
    assert main(["prune", str(llava_folder), str(tmp_path / "dense"), *flags, "--propagate", "dense"]) == 0
    assert main(["prune", str(llava_folder), str(tmp_path / "default"), *flags]) == 0
    assert seen == ["dense", "pruned"]
