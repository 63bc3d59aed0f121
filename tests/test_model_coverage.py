"""Every architecture of tests/factories.py's MODEL_COVERAGE (explicit specs, plus two found structurally) end to
end on a tiny config: prune with a modality split (vision 0.5, language 2:4), SparseLoRA finetune a few steps,
merge, save, reload, generate, save compressed and load; the zeros of every pruned weight equal its mask after
merge, after reload and after the compressed round trip.
Then the structural fallback itself: it agrees with the explicit specs, and it errors saying what it looked for."""

from __future__ import annotations

import pytest
import torch
from factories import MODEL_COVERAGE, STRUCTURAL_ONLY, VOCAB
from torch import nn

from vlmsparse.masks import MaskSet
from vlmsparse.models import (
    get_arch_spec,
    model_class_for,
    part_of,
    prunable_linear_names,
    structural_spec,
    supported_model_types,
)
from vlmsparse.pipeline.compress import load_compressed, save_compressed
from vlmsparse.pipeline.prune import format_report, prune_model
from vlmsparse.pipeline.save import load_pruned
from vlmsparse.sparsity import detect_nm
from vlmsparse.training.finetune import finetune

ARCHS = list(MODEL_COVERAGE)
IMAGE_IDS = (VOCAB - 3, VOCAB - 2, VOCAB - 1)  # image / vision start / end tokens of the factories


class _Examples(torch.utils.data.Dataset):
    """Encoded examples (one row of the architecture's inputs each, batch dimension dropped) with labels on
    the real text tokens."""

    def __init__(self, model: nn.Module, make_inputs, flat_images: bool, num: int = 4) -> None:
        self.rows = []
        for seed in range(num):
            x = make_inputs(model, 1, 10 + seed)
            row = {k: (v if k == "pixel_values" and flat_images else v[0]) for k, v in x.items()}
            ids = row["input_ids"]
            keep = row["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(IMAGE_IDS))
            row["labels"] = torch.where(keep, ids, torch.full_like(ids, -100))
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _zeros_match(model: nn.Module, masks: MaskSet) -> dict[str, bool]:
    modules = dict(model.named_modules())
    return {n: torch.equal(modules[n].weight.detach() != 0, m) for n, m in masks.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_finetune_merge_save_reload_generate(arch, tmp_path):
    build, make_inputs = MODEL_COVERAGE[arch]
    model = build(0)
    spec = get_arch_spec(model)
    assert (spec.found is not None) == (arch in STRUCTURAL_ONLY), spec.name  # explicit specs are preferred
    vlm = "vision" in spec.parts
    allocation = {"vision": 0.5, "language": "2:4"} if vlm else {"language": "2:4"}
    calibration = [make_inputs(model, 2, 0), make_inputs(model, 2, 1)]
    masks = prune_model(model, "wanda", allocation=allocation, calibration=calibration, progress=False)

    # the split: every vision / language block linear, at its part's pattern, and nothing else
    by_part = {p: [n for n in masks if spec.part_of(n) == p] for p in ("vision", "connector", "language")}
    assert sorted(masks) == sorted(prunable_linear_names(model, ("vision", "language")))
    assert by_part["connector"] == [] and len(by_part["language"]) >= 2 * 4
    assert bool(by_part["vision"]) == vlm
    modules = dict(model.named_modules())
    for name in by_part["language"]:
        assert detect_nm(modules[name].weight.detach()) == "2:4", name
    for name in by_part["vision"]:
        assert (~masks[name]).float().mean().item() == pytest.approx(0.5), name
    assert all(_zeros_match(model, masks).values())
    assert masks.info["stages"] == spec.describe(model) and masks.info["stages"] in format_report(masks)
    assert spec.found in (None, masks.info["stages"])  # a structural spec's report says what it found
    pruned = {n: modules[n].weight.detach().clone() for n in masks}

    data = _Examples(model, make_inputs, spec.flat_images)
    record = finetune(model, data, tmp_path / "run", masks=masks, method="sparselora", max_steps=3, batch_size=2,
                      learning_rate=2e-2, progress=False)
    assert record["steps"] == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in record["losses"])
    assert record["mask_check"]["ok"], record["mask_check"]

    reloaded, loaded_masks = load_pruned(tmp_path / "run" / "merged")
    assert type(reloaded) is type(model)
    assert sorted(loaded_masks) == sorted(masks)
    assert all(torch.equal(loaded_masks[n], masks[n]) for n in masks)
    assert all(_zeros_match(reloaded, masks).values())  # zeros == mask after merge + save + reload, bit for bit
    reloaded_modules = dict(reloaded.named_modules())
    assert any(not torch.equal(reloaded_modules[n].weight, pruned[n]) for n in masks)  # the adapters merged

    x = make_inputs(reloaded, 1, 5)
    with torch.no_grad():
        logits = reloaded(**x).logits
        out = reloaded.generate(**x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.isfinite(logits).all()
    assert out.shape == (1, x["input_ids"].shape[1] + 2)

    save_compressed(reloaded, tmp_path / "packed", masks=loaded_masks)  # the 2:4 language weights packed
    unpacked = load_compressed(tmp_path / "packed")
    assert all(_zeros_match(unpacked, masks).values())
    with torch.no_grad():
        assert torch.equal(unpacked(**x).logits, logits)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in STRUCTURAL_ONLY])
def test_structural_fallback_agrees_with_the_explicit_spec(arch):
    model = MODEL_COVERAGE[arch][0](0)
    explicit, found = get_arch_spec(model), structural_spec(model)
    assert found.found and found.found in found.describe(model)
    # the language blocks are the same; the vision blocks the longest list of them (Mllama: its local encoder)
    assert prunable_linear_names_of(found, model, "language") == prunable_linear_names(model, "language")
    vision = prunable_linear_names_of(found, model, "vision")
    assert set(vision) <= set(prunable_linear_names(model, "vision"))
    assert bool(vision) == ("vision" in explicit.parts)
    for name in vision:
        assert found.part_of(name) == explicit.part_of(name) == "vision"


def prunable_linear_names_of(spec, model: nn.Module, part: str) -> list[str]:
    names = []
    for stage in spec.resolve(model):
        if stage.part == part and stage.spec.default:
            for block_name, block in zip(stage.block_names, stage.blocks):
                names += [f"{block_name}.{s}" for s, m in block.named_modules() if isinstance(m, nn.Linear)]
    return names


def test_structural_parts_names_and_classes_without_a_loaded_model():
    """model_type strings with no explicit spec resolve through transformers' auto classes (inspect, load)."""
    assert "granite" not in supported_model_types() and "internvl" not in supported_model_types()
    assert part_of("model.layers.0.self_attn.q_proj.weight", "granite") == "language"
    assert part_of("model.vision_tower.encoder.layer.1.mlp.fc1.weight", "internvl") == "vision"
    assert part_of("model.multi_modal_projector.linear_1.weight", "internvl") == "connector"
    assert part_of("model.language_model.layers.0.mlp.up_proj.weight", "internvl") == "language"
    assert part_of("lm_head.weight", "internvl") == "language"
    assert model_class_for("internvl").__name__ == "InternVLForConditionalGeneration"
    assert part_of("model.visual.merger.mlp.0.weight", "qwen2_vl") == "connector"  # dotted prefix wins
    assert part_of("model.visual.blocks.0.attn.qkv.weight", "qwen2_vl") == "vision"


def test_structural_fallback_errors_say_what_they_looked_for():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                                      eos_token_id=2))
    with pytest.raises(ValueError, match=r"'gpt2' \(GPT2LMHeadModel\): no explicit spec.*no list of decoder "
                                         r"blocks.*ArchSpec"):
        get_arch_spec(gpt2)  # GPT-2's blocks hold Conv1D, not nn.Linear

    class NoVision(nn.Module):  # a vision_config but no vision tower
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "toy_vlm", "vision_config": {}})()
            self.model = nn.Module()
            self.model.language_model = nn.Module()
            self.model.language_model.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16)) for _ in range(2))

    with pytest.raises(ValueError, match=r"toy_vlm.*looked for a vision tower.*model.language_model: "
                                         r"model.language_model.layers \(2 x Sequential\)"):
        get_arch_spec(NoVision())
    with pytest.raises(ValueError, match="unsupported architecture 'no_such_model'"):
        part_of("x.weight", "no_such_model")


def test_image_inputs_are_required_beside_pixel_values():
    """A batch with pixel_values but without the architecture's other image inputs is refused before pruning."""
    build, make_inputs = MODEL_COVERAGE["qwen2_vl"]
    model = build(0)
    batch = make_inputs(model, 2, 0)
    del batch["image_grid_thw"]
    before = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match="calibration batch 0: Qwen2-VL calibration inputs need image_grid_thw"):
        prune_model(model, "wanda", calibration=[batch], progress=False)
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, before)
    text = MODEL_COVERAGE["qwen2"][1](model, 2, 0)  # text alone needs no image inputs
    get_arch_spec(model).check_inputs(model, text)


def test_collator_concatenates_flat_images_and_pads_multi_dim_keys():
    from vlmsparse.data.datasets import VLMCollator

    rows = [{"input_ids": torch.tensor([5, 6, 7]), "pixel_values": torch.ones(4, 8),
             "image_grid_thw": torch.tensor([1, 2, 2]), "cross_attention_mask": torch.ones(3, 1, 2)},
            {"input_ids": torch.tensor([5, 6]), "pixel_values": torch.zeros(8, 8),
             "image_grid_thw": torch.tensor([1, 2, 4]), "cross_attention_mask": torch.ones(2, 1, 2)}]
    batch = VLMCollator(pad_token_id=0, flat_images=True)(rows)
    assert batch["pixel_values"].shape == (12, 8) and batch["pixel_values"][:4].eq(1).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert batch["cross_attention_mask"].shape == (2, 3, 1, 2) and batch["cross_attention_mask"][1, 2].eq(0).all()
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    with pytest.raises(RuntimeError):  # stacked, the images' different patch counts do not fit one tensor
        VLMCollator(pad_token_id=0)(rows)
    bad = [dict(rows[0]), {**rows[1], "cross_attention_mask": torch.ones(2, 1, 3)}]
    with pytest.raises(ValueError, match="may differ in the first dimension only"):
        VLMCollator(pad_token_id=0, flat_images=True)(bad)


@pytest.mark.parametrize("arch", ["qwen2_vl", "internvl", "granite"])
def test_inspect_names_the_parts_of_a_saved_folder(arch, tmp_path):
    """``vlmsparse inspect`` on a pruned folder: the architecture line (for a structural spec, what it found, as
    this checkpoint's config lays it out) and a part per row, the same as the loaded model's spec gives."""
    from vlmsparse.pipeline.inspect import inspect_checkpoint
    from vlmsparse.pipeline.save import save_pruned

    build, _ = MODEL_COVERAGE[arch]
    model = build(0)
    masks = prune_model(model, "magnitude", allocation="equal", sparsity="2:4", progress=False)
    save_pruned(model, masks, tmp_path / "m")
    report = inspect_checkpoint(tmp_path / "m")
    spec = get_arch_spec(model)
    assert report.architecture == f"{spec.name}: {spec.describe(model)}"
    assert ("structural" in report.architecture) == (arch in STRUCTURAL_ONLY)
    pruned = [r for r in report.rows if r.name in masks]
    assert len(pruned) == len(masks) and all(r.nm == "2:4" and r.inside_mask for r in pruned)
    assert all(r.part == spec.part_of(r.name) for r in report.rows)
    assert {r.part for r in pruned} == ({"vision", "language"} if "vision" in spec.parts else {"language"})
    assert report.to_dict()["architecture"] == report.architecture


def test_cli_lists_the_supported_architectures_and_the_readme_shows_the_same(capsys):
    """README's table is supported_table() (regenerate it with
    ``python -c "from vlmsparse.models import supported_table; print(supported_table())"``)."""
    import json
    from pathlib import Path

    from vlmsparse.cli import main
    from vlmsparse.models import supported_architectures, supported_table

    assert main(["inspect", "--supported"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == supported_table()
    for row in supported_architectures():
        assert f"| {row['name']} |" in out and f"`{row['model_class']}`" in out
    assert main(["inspect", "--supported", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {t for r in rows for t in r["model_types"].split(", ")} == set(supported_model_types())
    assert main(["inspect"]) == 2 and "give a PATH" in capsys.readouterr().err
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- supported-architectures:start -->\n", "<!-- supported-architectures:end -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == supported_table()


def test_llava_next_through_its_processor_prune_finetune_and_vqa(tmp_path):
    """With a real processor (LLaVA-NeXT: it returns image_sizes beside pixel_values [1, tiles, 3, H, W]):
    calibration batches, the synthetic data set through the encoder and collator, and the VQA evaluation all
    pass its extra inputs through; the merged model's answers equal a one-row loop."""
    from factories import synthetic_llava_next_processor, tiny_llava_next

    from vlmsparse.data import synthetic
    from vlmsparse.eval.vqa import VQARow, generate_answers

    processor = synthetic_llava_next_processor()
    model = tiny_llava_next(0)
    model.config.image_token_index = 4  # "<image>" of the word-level tokenizer
    samples = synthetic.make_vqa_samples(4, seed=3)
    prompt = "USER: <image>\n{question} ASSISTANT:"
    calibration = [processor(images=[s.image for s in samples[:2]], text=[prompt.format(question=s.question)
                                                                       for s in samples[:2]],
                             padding=True, return_tensors="pt")]
    assert "image_sizes" in calibration[0]
    masks = prune_model(model, "wanda", allocation={"vision": 0.5, "language": "2:4"},
                        calibration=[dict(b) for b in calibration], progress=False)
    record = finetune(model, "synthetic:4", tmp_path / "run", masks=masks, processor=processor, max_steps=4,
                      batch_size=2, learning_rate=2e-2, progress=False)
    losses = [e["loss"] for e in record["losses"]]
    assert record["mask_check"]["ok"] and losses[-1] < losses[0], losses
    reloaded, _ = load_pruned(tmp_path / "run" / "merged")
    assert all(_zeros_match(reloaded, masks).values())
    rows = [VQARow(question=s.question, answers=(s.answer,), image=s.image, question_id=i)
            for i, s in enumerate(samples)]
    batched = generate_answers(reloaded, processor, rows, batch_size=3, max_new_tokens=2)
    assert batched == [generate_answers(reloaded, processor, [r], batch_size=1, max_new_tokens=2)[0] for r in rows]


def test_encoded_examples_keep_every_per_example_processor_output():
    """encode_example keeps a 2-D pixel_values as it is (Qwen2-VL's patches [P, D]) and drops the batch dimension
    of every other [1, ...] output the processor makes, whatever its rank (pixel_attention_mask [1, N, H, W])."""
    from vlmsparse.data.datasets import Example, encode_example
    from vlmsparse.data.vocab import build_tokenizer

    class Processor:  # the output layout of a Qwen2-VL / Idefics3-style processor for one example
        image_processor = None
        tokenizer = build_tokenizer()

        def __call__(self, images, text, return_tensors):
            ids = torch.tensor([self.tokenizer(text)["input_ids"]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.ones(16, 24),
                    "image_grid_thw": torch.tensor([[1, 4, 4]]),
                    "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool)}

    example = Example(image=torch.zeros(3, 32, 32), turns=(("human", "<image>\nwhat color"), ("gpt", "red")))
    out = encode_example(Processor(), example)
    assert out["pixel_values"].shape == (16, 24)
    assert out["image_grid_thw"].tolist() == [1, 4, 4]
    assert out["pixel_attention_mask"].shape == (1, 32, 32)


@pytest.mark.parametrize("arch", ["gemma3_text_mixed", "mllama_text", *ARCHS])
def test_calibration_runs_each_block_as_the_model_does(arch):
    """Each block of a stage, run on the captured inputs with its captured arguments, gives the output the
    model's own forward gives it (Gemma 3's full-attention block its own mask and rotary embedding, Qwen2.5-VL's
    full-attention vision block its own cu_seqlens): block 0's arguments are not reused where they differ. A block
    the forward skips (Mllama's cross-attention blocks on text without pixel_values) is skipped here too: its
    inputs pass on, so every later block's inputs are the forward's."""
    from factories import text_inputs, tiny_gemma3_text_mixed, tiny_mllama

    from vlmsparse.pipeline.prune.capture import _capture, _run_block

    if arch == "gemma3_text_mixed":
        model = tiny_gemma3_text_mixed(0)
        x = text_inputs(model, 2, 0)
    elif arch == "mllama_text":
        model = tiny_mllama(0, text_layers=5, cross_attention_layers=(1, 3))
        x = text_inputs(model, 2, 0)
    else:
        build, make_inputs = MODEL_COVERAGE[arch]
        model = build(0)
        x = make_inputs(model, 2, 0)
    spec = get_arch_spec(model)
    cpu = torch.device("cpu")
    for stage in spec.resolve(model):
        if stage.spec.single:
            continue
        if "pixel_values" not in x and stage.part != "language":
            continue  # a text batch never reaches the vision tower
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def keep(index: int, store: dict = outputs):
            return lambda module, args, out: store.setdefault(index, out[0] if isinstance(out, tuple) else out)

        def keep_input(index: int, store: dict = inputs):
            def hook(module, args, kwargs):
                store.setdefault(index, args[0] if args else
                                 next(v for k, v in kwargs.items() if k.startswith("hidden_state")))
            return hook

        hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(stage.blocks)]
        hooks += [b.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(stage.blocks)]
        with torch.no_grad():
            model(**x, use_cache=False)
        for h in hooks:
            h.remove()
        (batch,) = _capture(model, stage, [x], cpu, None)
        with torch.no_grad():
            for index, block in enumerate(stage.blocks):
                if index not in inputs:  # the forward skipped it: so does the sequential pass
                    assert not batch.reaches(index), f"{stage.path}.{index}"
                    continue
                assert batch.reaches(index)
                torch.testing.assert_close(batch.hidden, inputs[index], msg=f"{stage.path}.{index} inputs")
                batch.hidden = _run_block(block, index, batch, cpu)
                torch.testing.assert_close(batch.hidden, outputs[index], msg=f"{stage.path}.{index}")
        if arch == "mllama_text" and stage.part == "language":
            assert sorted(inputs) == [0, 2, 4]  # the cross-attention blocks 1 and 3 skipped


def test_structural_fallback_logs_what_it_found(caplog):
    import vlmsparse.models.specs as specs

    model = MODEL_COVERAGE["internvl"][0](0)
    specs._logged.discard(type(model).__name__)
    with caplog.at_level("INFO", logger="vlmsparse.models.specs"):
        spec = get_arch_spec(model)
        get_arch_spec(model)  # once per class
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"InternVLForConditionalGeneration has no explicit spec; found structurally: {spec.found}"]
    assert spec.found == ("vision: model.vision_tower.encoder.layer (2 blocks); connector: model.multi_modal_projector; "
                          "language: model.language_model.layers (2 blocks)")


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsegpt_and_connector_pruning(arch):
    """SparseGPT 2:4 on every block linear (stacked q/k/v, gate/up), and the connector pruned when asked."""
    build, make_inputs = MODEL_COVERAGE[arch]
    model = build(0)
    masks = prune_model(model, "sparsegpt", sparsity="2:4", calibration=[make_inputs(model, 2, 0)], progress=False)
    assert sorted(masks) == sorted(prunable_linear_names(model))
    modules = dict(model.named_modules())
    assert all(detect_nm(modules[n].weight.detach()) == "2:4" for n in masks)
    assert all(_zeros_match(model, masks).values())
    spec = get_arch_spec(model)
    # Gemma 3's projector is a bare weight matrix (no nn.Linear): nothing there to prune
    if "connector" in spec.parts and prunable_linear_names(model, "connector", include_non_default=True):
        model = build(0)
        masks = prune_model(model, "magnitude", allocation={"connector": 0.5}, progress=False)
        connector = prunable_linear_names(model, "connector", include_non_default=True)
        assert sorted(masks) == sorted(connector) and all(spec.part_of(n) == "connector" for n in masks)


def test_structural_fallback_on_a_model_without_a_base_model():
    """Parts as children of the model itself (no ``model.model``): the output head is not a connector."""

    def blocks(n: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(n))

    class ToyVLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "toy_vlm", "vision_config": {}})()
            self.image_encoder = nn.Module()
            self.image_encoder.layers = blocks(2)
            self.projector = nn.Linear(16, 16)
            self.llm = nn.Module()
            self.llm.layers = blocks(3)
            self.lm_head = nn.Linear(16, 32)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    model = ToyVLM()
    spec = get_arch_spec(model)
    assert spec.found == ("vision: image_encoder.layers (2 blocks); connector: projector; "
                          "language: llm.layers (3 blocks)")
    assert [spec.part_of(n) for n in ("image_encoder.layers.0.0", "projector", "llm.layers.2.2", "lm_head")] == [
        "vision", "connector", "language", "language"]
    assert len(prunable_linear_names(model)) == 2 * 2 + 3 * 2
