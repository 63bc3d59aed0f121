"""``vlmsparse.prune_folder``: the whole prune-a-folder run (what ``vlmsparse prune`` runs), called directly.

Outcomes checked: the folder it writes equals the library pieces run by hand (load, calibrate, prune_model,
save_pruned), bit for bit; bad inputs are refused before the model loads, with the parameter's name; a failure
(before or during pruning) leaves the output folder as it was; a text source calibrates a model whose vision /
connector parts are left dense at 0 (issue 15), and an Mllama's language part, its cross-attention blocks left dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import (
    save_blip2_folder,
    synthetic_processor,
    tiny_blip2,
    tiny_blip2_t5,
    tiny_llava,
    tiny_mllama,
)

import vlmsparse
from vlmsparse.masks import MaskSet
from vlmsparse.models import prunable_linear_names
from vlmsparse.pipeline.save import load_model, load_pruned


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune-folder") / "llava"
    model = tiny_llava(seed=0)
    model.config.image_token_index = 4  # "<image>" of the synthetic processor
    model.save_pretrained(folder)
    synthetic_processor("llava").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    return save_blip2_folder(tmp_path_factory.mktemp("prune-folder") / "blip2", tiny_blip2())


@pytest.fixture(scope="module")
def blip2_t5_folder(tmp_path_factory):
    return save_blip2_folder(tmp_path_factory.mktemp("prune-folder") / "blip2-t5", tiny_blip2_t5())


@pytest.fixture(scope="module")
def mllama_folder(tmp_path_factory):
    """A tiny Mllama (language blocks 0 and 2 self-attention, 1 cross-attention) with a tokenizer, no processor."""
    from vlmsparse.data.vocab import build_tokenizer

    folder = tmp_path_factory.mktemp("prune-folder") / "mllama"
    tiny_mllama(0).save_pretrained(folder)
    build_tokenizer("a red circle left of blue square".split()).save_pretrained(folder)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(["a red circle left of a blue square"] * 60))
    return path


def test_prune_folder_is_the_library_pieces_run_by_hand(tmp_path, llava_folder):
    """Wanda on synthetic calibration: the same masks and weights as loading, calibrating, pruning and saving by
    hand; the returned masks are the saved ones; the processor goes along."""
    from vlmsparse.data.calibration import build_calibration_batches, load_calibration_samples
    from vlmsparse.models import vision_image_size
    from vlmsparse.pipeline.prune import prune_model, report_of

    out, masks = vlmsparse.prune_folder(llava_folder, tmp_path / "out", method="wanda", sparsity="2:4",
                                        vision="0.5", nsamples=4, batch_size=2, progress=False)
    assert out == (tmp_path / "out").resolve() and isinstance(masks, MaskSet)
    assert (out / "tokenizer_config.json").exists() or (out / "tokenizer.json").exists()
    assert {r.name for r in report_of(masks)} == set(masks)

    model = load_model(llava_folder)
    processor = vlmsparse.pipeline.save.load_processor(llava_folder)
    samples = load_calibration_samples("synthetic", 4, 0, image_size=vision_image_size(model))
    batches = build_calibration_batches(samples, processor, 2)
    expected = prune_model(model, method="wanda", sparsity="2:4", allocation={"vision": "0.5", "language": "2:4"},
                           calibration=batches, progress=False)

    saved, saved_masks = load_pruned(out)
    assert list(saved_masks) == list(expected) == list(masks)
    assert all(torch.equal(saved_masks[n], expected[n]) and torch.equal(masks[n], expected[n]) for n in expected)
    assert {masks.patterns[n] for n in prunable_linear_names(saved, parts="vision")} == {"0.5"}
    assert {masks.patterns[n] for n in prunable_linear_names(saved, parts="language")} == {"2:4"}
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in saved.state_dict().items())


def test_prune_folder_refuses_bad_inputs_before_the_model_loads(tmp_path, blip2_folder, monkeypatch):
    """Each bad input is a clear error naming the parameter, raised before the model loads; the existing
    output folder is untouched and no new one appears."""
    import vlmsparse.pipeline.save as save

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(save, "load_model", no_load)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    corpus = _corpus(tmp_path)
    cases = [
        (dict(output=existing), FileExistsError, r"already exists; choose another folder or pass overwrite=True"),
        (dict(output=blip2_folder / "pruned"), ValueError, "choose a folder outside the input"),
        (dict(nsamples=0), ValueError, "nsamples must be >= 1"),
        (dict(seqlen=0), ValueError, "seqlen must be >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(max_words=0), ValueError, "max_words must be >= 1"),
        (dict(allocation="owl", connector="0.5"), ValueError,
         "allocation 'owl' cannot be combined with vision / language / connector"),
        (dict(allocation={"language": "2:4"}, vision="0.5"), ValueError, "not both"),
        (dict(method="sparsegpt", scope="row"), ValueError, "allowed: auto"),
        (dict(sparsity="4:4"), ValueError, "4:4"),
        (dict(dtype="float8"), ValueError, "dtype: got 'float8'"),
        (dict(device="warp-drive"), ValueError, "device 'warp-drive' is not a device name"),
        (dict(calibration=tmp_path / "absent.jsonl"), FileNotFoundError, "absent.jsonl"),
        (dict(calibration=corpus, seqlen=8), ValueError,  # a text cannot calibrate the vision part
         "a text source has no images, so it cannot calibrate the vision part"),
        (dict(calibration=corpus, seqlen=8, vision="0", connector="0.5"), ValueError,
         "cannot calibrate the connector part"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(output=tmp_path / "new", method="wanda", progress=False) | overrides
        with pytest.raises(error, match=message):
            vlmsparse.prune_folder(blip2_folder, **kwargs)
        assert not (tmp_path / "new").exists() and _tree(existing) == {"notes.txt": b"keep me"}
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((blip2_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model weights"):
        vlmsparse.prune_folder(tmp_path / "noweights", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "existing", "noweights"]


def test_a_failed_prune_leaves_the_output_as_it_was(tmp_path, blip2_folder, monkeypatch):
    import vlmsparse.pipeline.prune as prune

    out, _ = vlmsparse.prune_folder(blip2_folder, tmp_path / "out", method="magnitude", progress=False)
    before = _tree(out)

    def failing_prune(*args, **kwargs):  # pruning fails after the model has loaded
        raise ValueError("calibration activations are not finite")

    monkeypatch.setattr(prune, "prune_model", failing_prune)
    for target, overwrite in ((tmp_path / "new", False), (out, True)):
        with pytest.raises(ValueError, match="not finite"):
            vlmsparse.prune_folder(blip2_folder, target, method="magnitude", overwrite=overwrite, progress=False)
    assert not (tmp_path / "new").exists() and _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize("parts", [dict(vision="0"), dict(vision="0", connector="0"),
                                   dict(allocation={"language": "2:4", "vision": "0", "connector": 0})])
def test_text_calibration_with_the_vision_and_connector_left_dense(tmp_path, llava_folder, parts):
    """Issue 15 through the API: a part at 0 needs no images, so a text source prunes the language part alone;
    the vision and connector weights are the input's, bit for bit."""
    kwargs = dict(method="wanda", sparsity="2:4", calibration=_corpus(tmp_path), seqlen=8, nsamples=2,
                  progress=False) | parts
    out, masks = vlmsparse.prune_folder(llava_folder, tmp_path / "out", **kwargs)
    model, saved = load_pruned(out)
    assert set(masks) == set(saved) == set(prunable_linear_names(model, parts="language"))
    assert masks.sparsity() == 0.5 and masks.info["calibration_batches"] == "1"
    before, after = dict(load_model(llava_folder).named_parameters()), dict(model.named_parameters())
    dense = prunable_linear_names(model, parts=("vision", "connector"), include_non_default=True)
    assert dense and all(torch.equal(before[f"{n}.weight"], after[f"{n}.weight"]) for n in dense)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("folder", ["blip2_folder", "blip2_t5_folder"])
def test_text_calibration_of_a_blip2_language_part(tmp_path, request, folder, method):
    """BLIP-2 (OPT, Flan-T5) needs pixel_values in its forward; allocation 'language' with a text source runs its
    language model alone (Flan-T5: the decoder reads the windows shifted right): exactly the language linears
    pruned to 2:4, the masks those of prune_model on text_calibration_batches by hand, vision and connector
    unchanged."""
    from vlmsparse.data.calibration import text_calibration_batches
    from vlmsparse.models import decoder_start_token_id
    from vlmsparse.pipeline.prune import prune_model

    source = request.getfixturevalue(folder)
    corpus = _corpus(tmp_path)
    out, masks = vlmsparse.prune_folder(source, tmp_path / "out", method=method, sparsity="2:4",
                                        allocation="language", calibration=corpus, seqlen=8, nsamples=4,
                                        batch_size=2, progress=False)
    model, saved = load_pruned(out)
    language = prunable_linear_names(model, parts="language")
    assert list(masks) == list(saved) == language and masks.info["calibration_batches"] == "2"
    assert all(masks.patterns[n] == "2:4" and masks[n].float().mean() == 0.5 for n in language)
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[n].weight != 0, masks[n]) for n in language)
    reference = load_model(source)
    processor = vlmsparse.pipeline.save.load_processor(source)
    batches = text_calibration_batches(corpus, processor, nsamples=4, seqlen=8, batch_size=2,
                                       decoder_start_token_id=decoder_start_token_id(reference))
    expected = prune_model(reference, method=method, sparsity="2:4", allocation="language", calibration=batches,
                           progress=False)
    assert all(torch.equal(masks[n], expected[n]) for n in expected) and list(expected) == language
    before, after = dict(load_model(source).named_parameters()), dict(model.named_parameters())
    dense = [k for k in before if not k.startswith("language_model.")]
    assert dense and all(torch.equal(before[k], after[k]) for k in dense)


def test_text_calibration_of_an_mllama_language_part(tmp_path, mllama_folder, capsys):
    """Mllama's forward skips its cross-attention blocks on text: a text source prunes the self-attention blocks to
    2:4 (the masks those of prune_model on text_calibration_batches by hand) and leaves the cross-attention block
    dense, said in the saved masks' info and the CLI's report (text and --json); every other weight unchanged."""
    from vlmsparse.cli import main
    from vlmsparse.data.calibration import text_calibration_batches
    from vlmsparse.pipeline.prune import not_pruned_of, prune_model

    corpus = _corpus(tmp_path)
    out, masks = vlmsparse.prune_folder(mllama_folder, tmp_path / "out", method="wanda", sparsity="2:4",
                                        allocation="language", calibration=corpus, seqlen=8, nsamples=4,
                                        batch_size=2, progress=False)
    model, saved = load_pruned(out)
    language = prunable_linear_names(model, parts="language")
    pruned = [n for n in language if ".layers.1." not in n]
    assert list(masks) == list(saved) == pruned and masks.sparsity() == 0.5
    assert [r["block"] for r in not_pruned_of(saved)] == ["model.language_model.layers.1"]
    assert not_pruned_of(saved)[0]["linears"] == [n for n in language if ".layers.1." in n]
    reference = load_model(mllama_folder)
    batches = text_calibration_batches(corpus, vlmsparse.pipeline.save.load_processor(mllama_folder), nsamples=4,
                                       seqlen=8, batch_size=2)
    expected = prune_model(reference, method="wanda", sparsity="2:4", allocation="language", calibration=batches,
                           progress=False)
    assert list(expected) == pruned and all(torch.equal(masks[n], expected[n]) for n in pruned)
    before, after = dict(load_model(mllama_folder).named_parameters()), dict(model.named_parameters())
    unchanged = [k for k in before if k.removesuffix(".weight") not in pruned]
    assert all(torch.equal(before[k], after[k]) for k in unchanged)

    flags = ["--method", "wanda", "--sparsity", "2:4", "--allocation", "language", "--calibration", str(corpus),
             "--seqlen", "8", "--nsamples", "4", "--batch-size", "2"]
    assert main(["prune", str(mllama_folder), str(tmp_path / "cli"), *flags]) == 0
    assert "left dense: model.language_model.layers.1 (7 language linears)" in capsys.readouterr().out
    assert main(["prune", str(mllama_folder), str(tmp_path / "cli-json"), *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["block"] for r in report["not_pruned"]] == ["model.language_model.layers.1"]
    assert [r["name"] for r in report["layers"]] == pruned


@pytest.mark.parametrize("parts", [dict(vision=0), dict(vision="0"), dict(vision="0%", connector=0.0),
                                   dict(allocation={"language": "2:4", "vision": 0})])
def test_a_part_at_0_that_a_language_model_lacks_is_ignored(tmp_path, parts):
    """vision / connector at 0 on a language model prune what the call without them prunes; a non-zero pattern
    for a part the model lacks is refused, naming it, and nothing is written."""
    from factories import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    kwargs = dict(method="magnitude", sparsity="2:4", progress=False)
    _, expected = vlmsparse.prune_folder(tmp_path / "llama", tmp_path / "plain", **kwargs)
    out, masks = vlmsparse.prune_folder(tmp_path / "llama", tmp_path / "out", **(kwargs | parts))
    assert list(masks) == list(expected) and masks.sparsity() == 0.5
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
    assert all(torch.equal(a, b) for a, b in zip(load_model(out).state_dict().values(),
                                                 load_model(tmp_path / "plain").state_dict().values()))
    with pytest.raises(ValueError, match="has no vision part to prune"):
        vlmsparse.prune_folder(tmp_path / "llama", tmp_path / "x", **kwargs, vision="2:4")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("build", [tiny_blip2_t5, tiny_blip2])
def test_a_folder_without_tokenizer_files_has_no_processor(tmp_path, build, monkeypatch):
    """load_processor on a BLIP-2 folder holding no tokenizer files is None (transformers alone would build an
    empty GPT2 tokenizer from the config), so prune_folder says so before the model loads; the tokenizer alone,
    or the whole processor, load with their words."""
    from vlmsparse.pipeline import save

    processor = synthetic_processor("blip2")
    build().save_pretrained(tmp_path / "bare")
    assert save.load_processor(tmp_path / "bare") is None
    build().save_pretrained(tmp_path / "tokenizer")
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    build().save_pretrained(tmp_path / "processor")
    processor.save_pretrained(tmp_path / "processor")
    words = len(processor.tokenizer)
    assert len(save.load_processor(tmp_path / "tokenizer")) == words
    assert len(save.load_processor(tmp_path / "processor").tokenizer) == words

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the processor was checked")

    monkeypatch.setattr(save, "load_model", no_model)
    with pytest.raises(ValueError, match="bare holds no processor or tokenizer files to build calibration inputs"):
        vlmsparse.prune_folder(tmp_path / "bare", tmp_path / "out", method="wanda", progress=False)
    assert not (tmp_path / "out").exists()


def test_pruned_parts_leaves_out_dense_and_absent_parts():
    from vlmsparse.pipeline.prune import PruneConfig

    every = {"vision", "connector", "language"}
    config = PruneConfig(allocation={"vision": 0, "language": "2:4", "connector": "0%"})
    assert config.pruned_parts(every) == {"language"}
    assert PruneConfig(allocation={"vision": "4:8", "connector": 0.3}).pruned_parts(every) == {"vision", "connector"}
    assert PruneConfig(sparsity="2:4").pruned_parts({"language"}) == {"language"}  # equal on a language model
    assert PruneConfig(sparsity=0, method="magnitude").pruned_parts(every) == set()


def test_prune_folder_dtype_by_name(tmp_path, blip2_folder):
    out, masks = vlmsparse.prune_folder(blip2_folder, tmp_path / "out", method="magnitude", sparsity="2:4",
                                        dtype="bfloat16", progress=False)
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")  # the weights as written, whatever dtype a loader picks
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert masks.sparsity() == 0.5
