"""Finetuning a tiny pruned LLaVA / BLIP-2 with each method on HF Trainer: loss, masks, record, resume,
distillation, checkpoints; LLaVA on batches mixing text-only and image examples; a language model alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import pruned_tiny, synthetic_processor
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

from vlmsparse.data.datasets import SyntheticVQADataset
from vlmsparse.integrations.peft import register_sparse_lora
from vlmsparse.masks import MASKS_FILENAME, MaskSet
from vlmsparse.modules.sparse_lora import SparseLoRALinear
from vlmsparse.training.finetune import ADAPTER_DIRNAME, RECORD_FILENAME, FinetuneError, finetune

FAST = dict(batch_size=4, learning_rate=2e-2, progress=False)


@pytest.fixture(scope="module")
def processor():
    return synthetic_processor("llava")


@pytest.fixture(scope="module")
def data(processor):
    return SyntheticVQADataset(processor, num=4, seed=0)


def _pruned_zeros_exact(weights: dict[str, torch.Tensor], masks: MaskSet) -> dict[str, int]:
    """Non-zero count at pruned entries, per module (0 everywhere when the sparsity is kept)."""
    return {n: int((weights[n + ".weight"][~m] != 0).sum()) for n, m in masks.items()}


def _reload(path, cls):
    model = cls.from_pretrained(path)
    return {n: p.detach() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("method", ["sparselora", "lora", "lora-remask", "full"])
def test_methods_train_and_keep_or_lose_masks(method, tmp_path, processor, data):
    model, masks = pruned_tiny("llava", "2:4")
    record = finetune(model, data, tmp_path, masks=masks, processor=processor, method=method, max_steps=8, **FAST)
    losses = [entry["loss"] for entry in record["losses"]]
    assert len(losses) == 8 and record["steps"] == 8
    assert losses[-1] < 0.95 * losses[0], losses  # a memorisable batch: the loss goes down
    assert record == json.loads((tmp_path / RECORD_FILENAME).read_text())
    assert record["sparsity_before"]["all"] == pytest.approx(0.5)
    assert set(record["sparsity_before"]) == {"all", "vision", "language"}
    assert record["train_time_s"] > 0 and record["peak_memory"]
    merged = tmp_path / "merged"
    weights = _reload(merged, LlavaForConditionalGeneration)
    nonzero = _pruned_zeros_exact(weights, masks)
    if method == "lora":  # the dense merge loses the sparsity and the record says so
        assert not record["mask_check"]["ok"] and not record["mask_check"]["required"]
        assert record["mask_check"]["pruned_entries_nonzero"] == sum(nonzero.values()) > 0
        assert record["sparsity_after"]["all"] < 0.1 and record["sparsity_lost"] > 0.4
        assert MaskSet.load(merged).sparsity() < 0.1  # the saved masks describe the merged weights
    else:  # every pruned weight is exactly zero in the saved merged model
        assert record["mask_check"] == {"ok": True, "required": True, "modules_violating": 0, "pruned_entries_nonzero": 0}
        assert sum(nonzero.values()) == 0
        assert record["sparsity_after"] == record["sparsity_before"] and record["sparsity_lost"] == 0
        saved = MaskSet.load(merged / MASKS_FILENAME)
        assert all(torch.equal(saved[n], masks[n]) for n in masks)
    # the weights did change (adapters were merged / weights trained)
    original = pruned_tiny("llava", "2:4")[0].state_dict()
    name = next(iter(masks)) + ".weight"
    assert not torch.equal(weights[name], original[name])
    if method != "full":  # only adapters trained: unmasked, untargeted weights are untouched
        key = "model.multi_modal_projector.linear_1.weight"
        assert torch.equal(weights[key], original[key])
    if method != "sparselora":
        assert record["adapter"] is None and not (tmp_path / ADAPTER_DIRNAME).exists()
        return
    # the adapter, saved as peft's files + masks: PeftModel.from_pretrained on the pruned model and peft's
    # merge_and_unload give the merged model's weights bit for bit
    assert record["adapter"] == str(tmp_path / ADAPTER_DIRNAME)
    config = LoraConfig.from_pretrained(str(tmp_path / ADAPTER_DIRNAME))
    register_sparse_lora(config, MaskSet.load(tmp_path / ADAPTER_DIRNAME))
    loaded = PeftModel.from_pretrained(pruned_tiny("llava", "2:4")[0], str(tmp_path / ADAPTER_DIRNAME), config=config)
    assert sum(isinstance(m, SparseLoRALinear) for m in loaded.modules()) == len(masks)
    peft_merged = loaded.merge_and_unload().state_dict()
    for name in masks:
        assert torch.equal(peft_merged[name + ".weight"], weights[name + ".weight"]), name


def test_resume_continues_with_the_same_losses(tmp_path, processor, data):
    model, masks = pruned_tiny("llava")
    full = finetune(model, data, tmp_path / "a", masks=masks, processor=processor, max_steps=4, save_steps=2, **FAST)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "trainable.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (tmp_path / "a" / ".staging").exists()  # staged then renamed, staging removed
    # a fresh model resumed from step 2 continues with the same losses as the uninterrupted run
    model, masks = pruned_tiny("llava")
    resumed = finetune(model, data, tmp_path / "a", masks=masks, processor=processor, max_steps=4, save_steps=2,
                       resume=checkpoint, **FAST)
    assert resumed["resumed_from"] == str(checkpoint)
    steps = {e["step"]: e["loss"] for e in resumed["losses"]}
    expected = {e["step"]: e["loss"] for e in full["losses"]}
    assert set(steps) >= {3, 4}
    for step in (3, 4):
        assert steps[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    # a checkpoint of the earlier own layer (keys lora_A.weight, not lora_A.default.weight) resumes the same way
    old = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(checkpoint, old)
    tensors = load_file(old / "trainable.safetensors")
    assert tensors and all(".lora_A.default." in k or ".lora_B.default." in k for k in tensors)
    save_file({k.replace(".default.", "."): v for k, v in tensors.items()}, old / "trainable.safetensors")
    model, masks = pruned_tiny("llava")
    resumed_old = finetune(model, data, tmp_path / "old", masks=masks, processor=processor, max_steps=4, save_steps=2,
                           resume=True, **FAST)
    assert resumed_old["resumed_from"] == str(old)
    assert [e["loss"] for e in resumed_old["losses"]] == [e["loss"] for e in resumed["losses"]]
    # checkpoints exist: a new run into the same folder must say so; another config is refused
    model, masks = pruned_tiny("llava")
    with pytest.raises(FileExistsError, match="holds a finished run"):
        finetune(model, data, tmp_path / "a", masks=masks, processor=processor, max_steps=4, **FAST)
    (tmp_path / "a" / RECORD_FILENAME).unlink()  # as if the run had been interrupted
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        finetune(model, data, tmp_path / "a", masks=masks, processor=processor, max_steps=4, **FAST)
    with pytest.raises(ValueError, match="different config.*learning_rate"):
        finetune(model, data, tmp_path / "a", masks=masks, processor=processor, max_steps=4, save_steps=2,
                 resume=True, **{**FAST, "learning_rate": 1e-3})
    other_masks = pruned_tiny("llava", "0.6")[1]
    with pytest.raises(ValueError, match="different config.*masks"):
        finetune(pruned_tiny("llava", "0.6")[0], data, tmp_path / "a", masks=other_masks, processor=processor,
                 max_steps=4, save_steps=2, resume=True, **FAST)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, processor, data):
    """2 micro-batches of 2 with accumulation train like one batch of 4 (every answer has 2 tokens, so the
    mean of the micro-batch means is the batch mean): the logged loss is not a sum over micro-batches."""
    runs = []
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        model, masks = pruned_tiny("llava")
        runs.append(finetune(model, data, tmp_path / name, masks=masks, processor=processor, max_steps=2,
                             logging_steps=1, **{**FAST, "batch_size": batch, "grad_accum": accum}))
    big, accum = ([(e["step"], e["loss"], e["grad_norm"]) for e in r["losses"]] for r in runs)
    assert [s for s, _, _ in accum] == [1, 2]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(big, accum, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)


def test_distillation_from_self_and_from_a_dense_checkpoint(tmp_path, processor, data):
    # teacher = the same network with adapters and masks off (dense weights kept beside the masks)
    model, masks = pruned_tiny("llava", keep_dense=True)
    dense = {n: p.detach().clone() for n, p in model.state_dict().items()}
    record = finetune(model, data, tmp_path / "self", masks=masks, processor=processor, max_steps=2,
                      distill_lambda=0.5, temperature=2.0, **FAST)
    assert record["teacher"] == "self" and record["mask_check"]["ok"]
    assert all(e["kl"] > 0 for e in record["losses"])  # the pruned student differs from its dense self
    for e in record["losses"]:
        assert e["loss"] == pytest.approx(0.5 * e["ce"] + 0.5 * e["kl"], rel=1e-3)
    merged = _reload(tmp_path / "self" / "merged", LlavaForConditionalGeneration)
    assert sum(_pruned_zeros_exact(merged, masks).values()) == 0
    name = next(iter(masks)) + ".weight"
    assert bool((dense[name][~masks[next(iter(masks))]] != 0).any())  # it really was dense
    # a pruned model has no dense weights to be its own teacher
    model, masks = pruned_tiny("llava")
    with pytest.raises(ValueError, match="needs the dense weights"):
        finetune(model, data, tmp_path / "bad", masks=masks, processor=processor, max_steps=1, distill_lambda=0.5, **FAST)
    # teacher = a separate dense checkpoint by path
    dense_model, _ = pruned_tiny("llava", keep_dense=True)
    dense_model.save_pretrained(tmp_path / "dense")
    record = finetune(model, data, tmp_path / "path", masks=masks, processor=processor, max_steps=1,
                      distill_lambda=0.1, teacher=str(tmp_path / "dense"), **FAST)
    assert record["teacher"] == str(tmp_path / "dense") and record["mask_check"]["ok"]
    assert all(e["kl"] > 0 for e in record["losses"])


def test_tiny_blip2_finetune(tmp_path):
    processor = synthetic_processor("blip2")
    model, masks = pruned_tiny("blip2", "2:4")
    data = SyntheticVQADataset(processor, num=4)
    record = finetune(model, data, tmp_path, masks=masks, processor=processor, max_steps=4, **FAST)
    losses = [e["loss"] for e in record["losses"]]
    assert losses[-1] < losses[0]
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == pytest.approx(0.5)
    weights = _reload(tmp_path / "merged", Blip2ForConditionalGeneration)
    assert sum(_pruned_zeros_exact(weights, masks).values()) == 0
    assert record["trainable_parameters"] > 0


def _pruned_blip2_t5(pattern: str):
    from factories import magnitude_pruned, tiny_blip2_t5

    model = tiny_blip2_t5(seed=1)
    model.config.image_token_index = 4  # "<image>" of the synthetic processor
    return model, magnitude_pruned(model, pattern)


def test_blip2_flan_t5_finetune(tmp_path):
    """An encoder-decoder language model (Flan-T5 style): data laid out for the decoder, adapters on encoder
    and decoder blocks, masks kept through the merge; a dataset laid out for a decoder-only model is refused."""
    from transformers import Blip2ForConditionalGeneration

    processor = synthetic_processor("blip2")
    model, masks = _pruned_blip2_t5("2:4")
    assert any(".decoder." in n for n in masks) and any(".encoder." in n and "language" in n for n in masks)
    with pytest.raises(ValueError, match="decoder_start_token_id=0"):
        finetune(model, SyntheticVQADataset(processor, num=4), tmp_path / "bad", masks=masks, processor=processor,
                 max_steps=1, **FAST)
    data = SyntheticVQADataset(processor, num=4, decoder_start_token_id=0)
    record = finetune(model, data, tmp_path / "run", masks=masks, processor=processor, max_steps=6, **FAST)
    losses = [e["loss"] for e in record["losses"]]
    assert losses[-1] < losses[0]
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == pytest.approx(0.5)
    weights = _reload(tmp_path / "run" / "merged", Blip2ForConditionalGeneration)
    assert sum(_pruned_zeros_exact(weights, masks).values()) == 0


def test_blip2_flan_t5_finetune_from_a_data_spec(tmp_path):
    """A data spec (``synthetic:N``) is laid out for the model found in the folder: no option to set."""
    from vlmsparse.pipeline.save import save_pruned

    processor = synthetic_processor("blip2")
    model, masks = _pruned_blip2_t5("0.5")
    save_pruned(model, masks, tmp_path / "pruned", processor=processor)
    record = finetune(tmp_path / "pruned", "synthetic:4", tmp_path / "run", max_steps=2, **FAST)
    assert record["steps"] == 2 and record["mask_check"]["ok"]


def test_connector_part_and_options(tmp_path, processor, data):
    # the connector gets (dense) adapters only when asked; gradient checkpointing runs; ranks per part apply
    model, masks = pruned_tiny("llava")
    record = finetune(model, data, tmp_path, masks=masks, processor=processor, max_steps=2,
                      parts=("language", "connector"), rank_language=16, gradient_checkpointing=True, **FAST)
    assert record["mask_check"]["ok"] and record["gradient_checkpointing"]
    hidden, layers = 32, 2
    # language: 7 linears per block (q k v o gate up down) at r=16; connector: 2 linears at r=8
    per_block = 16 * (4 * (hidden + hidden) + 2 * (hidden + 2 * hidden) + (2 * hidden + hidden))
    connector = 8 * (hidden + hidden) * 2
    assert record["trainable_parameters"] == layers * per_block + connector
    original = pruned_tiny("llava")[0].state_dict()
    weights = _reload(tmp_path / "merged", LlavaForConditionalGeneration)
    key = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(weights[key], original[key])
    vision = next(n for n in masks if "vision" in n) + ".weight"
    assert torch.equal(weights[vision], original[vision])  # vision not listed: untouched


def test_masks_must_match_and_must_be_given(tmp_path, processor, data):
    model, masks = pruned_tiny("llava", keep_dense=True)  # dense weights, masks that do not describe them
    with pytest.raises(ValueError, match="outside the masks are non-zero"):
        finetune(model, data, tmp_path, masks=masks, processor=processor, max_steps=1, **FAST)
    model, masks = pruned_tiny("llava")
    with pytest.raises(ValueError, match="masks_from_zeros"):
        finetune(model, data, tmp_path, processor=processor, max_steps=1, **FAST)
    record = finetune(model, data, tmp_path, masks_from_zeros=True, processor=processor, max_steps=1, **FAST)
    assert record["masks"]["modules"] == len(masks) and record["mask_check"]["ok"]
    with pytest.raises(FileExistsError, match="holds a finished run"):  # no silent overwrite of a result
        finetune(model, data, tmp_path, masks=masks, processor=processor, max_steps=1, **FAST)
    with pytest.raises(ValueError, match="unknown finetune option"):
        finetune(model, data, tmp_path, masks=masks, processor=processor, max_step=1)


def test_broken_masks_fail_loudly(tmp_path, processor, data, monkeypatch):
    """If a merge ever wrote a non-zero into a pruned entry, finetune stops and saves no merged model."""
    import importlib

    ft = importlib.import_module("vlmsparse.training.finetune")  # the module (the package exports the function)

    real_merge = ft._merge

    def bad_merge(model, config):
        merged = real_merge(model, config)
        name = next(iter(masks))
        with torch.no_grad():
            merged.get_submodule(name).weight[~masks[name]] = 1.0
        return merged

    model, masks = pruned_tiny("llava")
    monkeypatch.setattr(ft, "_merge", bad_merge)
    with pytest.raises(FinetuneError, match="must keep the masks"):
        finetune(model, data, tmp_path, masks=masks, processor=processor, max_steps=1, **FAST)
    assert not (tmp_path / "merged").exists()
    record = json.loads((tmp_path / RECORD_FILENAME).read_text())
    assert not record["mask_check"]["ok"] and record["mask_check"]["modules_violating"] == 1


def test_same_seed_same_run_and_clear_refusals(tmp_path, processor, data):
    """The adapters' initialisation follows the seed (two runs are bit for bit equal, another seed differs);
    a missing or foreign teacher and a language model alone are refused with a clear message."""
    runs = []
    for index, (name, seed) in enumerate((("a", 0), ("b", 0), ("c", 1))):
        model, masks = pruned_tiny("llava")
        torch.manual_seed(100 + index)  # whatever the global RNG holds before the call
        finetune(model, data, tmp_path / name, masks=masks, processor=processor, max_steps=2, seed=seed, **FAST)
        runs.append(_reload(tmp_path / name / "merged", LlavaForConditionalGeneration))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])

    model, masks = pruned_tiny("llava")
    with pytest.raises(FileNotFoundError, match="teacher folder .* does not exist"):
        finetune(model, data, tmp_path / "t1", masks=masks, processor=processor, max_steps=1,
                 distill_lambda=0.5, teacher=str(tmp_path / "nothere"), **FAST)
    blip, _ = pruned_tiny("blip2")
    blip.save_pretrained(tmp_path / "blip")
    with pytest.raises(ValueError, match="the teacher .* is a Blip2ForConditionalGeneration"):
        finetune(model, data, tmp_path / "t2", masks=masks, processor=processor, max_steps=1,
                 distill_lambda=0.5, teacher=str(tmp_path / "blip"), **FAST)
    from factories import tiny_llama

    # a language model alone trains on text: image-text data is refused, as a dataset or as the synthetic spec
    with pytest.raises(ValueError, match="have pixel_values, but LlamaForCausalLM is a language model alone"):
        finetune(tiny_llama(), data, tmp_path / "t3", masks=MaskSet(), processor=processor, max_steps=1, **FAST)
    with pytest.raises(ValueError, match="'synthetic:4': the synthetic data set is image-text, but "
                                         "LlamaForCausalLM is a language model alone"):
        finetune(tiny_llama(), "synthetic:4", tmp_path / "t4", masks=MaskSet(), processor=processor.tokenizer,
                 max_steps=1, **FAST)
    assert not (tmp_path / "t3").exists() and not (tmp_path / "t4").exists()


def test_a_finished_run_can_be_extended(tmp_path, processor, data):
    """Resume may change the run's length: 2 steps, then resumed to 4, equals 4 steps in one go (constant
    learning rate), and the merged model and the record are replaced by the longer run's."""
    model, masks = pruned_tiny("llava")
    full = finetune(model, data, tmp_path / "full", masks=masks, processor=processor, max_steps=4, save_steps=2, **FAST)
    model, masks = pruned_tiny("llava")
    finetune(model, data, tmp_path / "short", masks=masks, processor=processor, max_steps=2, save_steps=2, **FAST)
    model, masks = pruned_tiny("llava")
    longer = finetune(model, data, tmp_path / "short", masks=masks, processor=processor, max_steps=4, save_steps=2,
                      resume=True, **FAST)
    assert longer["steps"] == 4 and longer["resumed_from"].endswith("checkpoint-2")
    expected = {e["step"]: e["loss"] for e in full["losses"]}
    for e in longer["losses"]:
        assert e["loss"] == pytest.approx(expected[e["step"]], rel=1e-5, abs=1e-6)
    assert json.loads((tmp_path / "short" / RECORD_FILENAME).read_text())["steps"] == 4
    a = _reload(tmp_path / "full" / "merged", LlavaForConditionalGeneration)
    b = _reload(tmp_path / "short" / "merged", LlavaForConditionalGeneration)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def _mixed_conversations(tmp_path):
    """A conversation JSON of 2 image rows and 2 text-only rows (short answers, memorisable)."""
    from PIL import Image

    for color, name in [((255, 0, 0), "a.png"), ((0, 0, 255), "b.png")]:
        Image.new("RGB", (32, 32), color).save(tmp_path / name)
    rows = [{"image": n, "conversations": [{"from": "human", "value": "<image>\nwhat color is the object?"},
                                          {"from": "gpt", "value": c}]} for n, c in [("a.png", "red"), ("b.png", "blue")]]
    rows += [{"conversations": [{"from": "human", "value": "how many circles?"}, {"from": "gpt", "value": "two"}]},
             {"image": None, "conversations": [{"from": "human", "value": "describe this in one word"},
                                               {"from": "gpt", "value": "square"}]}]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    return tmp_path / "mixed.json"


def test_mixed_llava_batch_loss_and_training(tmp_path, processor):
    """A batch mixing image and text-only examples: our answer-token CE equals LLaVA's own loss from labels
    (the images go to the rows with image tokens); finetune on such data trains and keeps the masks."""
    from factories import tiny_llava

    from vlmsparse.data.datasets import ConversationDataset, VLMCollator, image_token_id
    from vlmsparse.training.losses import distillation_loss

    dataset = ConversationDataset(_mixed_conversations(tmp_path), processor)
    items = [dataset[i] for i in (2, 0, 3, 1)]  # text, image, text, image
    batch = VLMCollator(processor.tokenizer.pad_token_id, image_token_id(processor))(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    model = tiny_llava(seed=3)
    model.config.image_token_index = 4  # "<image>" of the synthetic processor
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours, _, _ = distillation_loss(model(**inputs).logits, batch["labels"])
        theirs = model(**inputs, labels=batch["labels"]).loss
        # the image rows do see their image: their logits differ from the same rows without it
        alone = model(**{k: v[1:2] for k, v in inputs.items() if k != "pixel_values"} | {
            "pixel_values": inputs["pixel_values"][:1]}).logits
        mixed = model(**inputs).logits[1:2, : alone.shape[1]]
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5) and ours.item() > 0.5
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-5)

    model, masks = pruned_tiny("llava", "2:4")
    record = finetune(model, dataset, tmp_path / "run", masks=masks, processor=processor, max_steps=8, **FAST)
    losses = [e["loss"] for e in record["losses"]]
    assert record["num_examples"] == 4 and len(losses) == 8
    assert losses[-1] < 0.95 * losses[0], losses
    assert record["mask_check"]["ok"] and record["sparsity_after"] == record["sparsity_before"]
    weights = _reload(tmp_path / "run" / "merged", LlavaForConditionalGeneration)
    assert sum(_pruned_zeros_exact(weights, masks).values()) == 0


def test_opt_language_model_alone_finetunes_in_memory(tmp_path, processor):
    """A pruned OPT with its tokenizer as the processor, on text-only conversation rows: the loss goes down
    and every pruned weight stays zero (the Llama folder through the CLI: tests/test_finetune_cli.py)."""
    from factories import magnitude_pruned, tiny_opt
    from transformers import OPTForCausalLM

    from vlmsparse.data.datasets import ConversationDataset

    model = tiny_opt(seed=1)
    masks = magnitude_pruned(model, "0.5", ("language",))
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for q, a in [("what color is the circle?", "red"), ("how many shapes?", "two")]]
    (tmp_path / "text.json").write_text(json.dumps(rows))
    data = ConversationDataset(tmp_path / "text.json", processor.tokenizer)
    record = finetune(model, data, tmp_path / "run", masks=masks, processor=processor.tokenizer, max_steps=8,
                      **{**FAST, "batch_size": 2})
    losses = [e["loss"] for e in record["losses"]]
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0], losses
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == pytest.approx(0.5)
    weights = _reload(tmp_path / "run" / "merged", OPTForCausalLM)
    assert sum(_pruned_zeros_exact(weights, masks).values()) == 0


def test_packed_base_trains_the_same_run_with_the_frozen_weights_packed(tmp_path, processor, data, monkeypatch):
    """packed_base=True: the 2:4 linears train over packed bases (checked inside the run), the losses and the
    merged model equal the nn.Linear-base run's (same seed; float32, summation order aside), the merged folder is
    an ordinary one; refusals for what a packed base cannot do."""
    import importlib

    from vlmsparse.modules.sparse_linear import SparseLinear

    finetune_module = importlib.import_module("vlmsparse.training.finetune")  # the package attribute is the function
    seen = {}
    real_build = finetune_module._build_trainer

    def spy(student, *args, **kwargs):  # the student as training starts
        layers = [m for m in student.modules() if isinstance(m, SparseLoRALinear)]
        seen["packed"] = sum(m.packed_base for m in layers)
        seen["layers"] = len(layers)
        seen["bases"] = sum(isinstance(m, SparseLinear) for m in student.modules())
        return real_build(student, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "_build_trainer", spy)
    runs = {}
    for packed in (False, True):
        model, masks = pruned_tiny("llava", "2:4")
        out = tmp_path / f"packed{packed}"
        runs[packed] = finetune(model, data, out, masks=masks, processor=processor, max_steps=4, packed_base=packed,
                                **FAST)
        if packed:
            assert seen["packed"] == seen["layers"] == seen["bases"] == len(masks)
    losses = {p: [e["loss"] for e in r["losses"]] for p, r in runs.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert runs[True]["mask_check"]["ok"] and runs[True]["sparsity_after"] == runs[True]["sparsity_before"]
    plain = _reload(tmp_path / "packedFalse" / "merged", LlavaForConditionalGeneration)
    packed_weights = _reload(tmp_path / "packedTrue" / "merged", LlavaForConditionalGeneration)
    assert plain.keys() == packed_weights.keys()
    for key in plain:
        torch.testing.assert_close(packed_weights[key], plain[key], rtol=1e-4, atol=1e-5)
    assert sum(_pruned_zeros_exact(packed_weights, masks).values()) == 0
    for bad in (dict(method="lora"), dict(distill_lambda=0.5, teacher="self")):
        with pytest.raises(ValueError, match="packed_base=True needs method='sparselora'"):
            finetune(pruned_tiny("llava", "2:4")[0], data, tmp_path / "bad", masks=masks, processor=processor,
                     max_steps=1, packed_base=True, **{**FAST, **bad})
    unstructured, unstructured_masks = pruned_tiny("llava", "0.5")
    with pytest.raises(ValueError, match="no adapted linear .* has a 2:4 mask"):
        finetune(unstructured, data, tmp_path / "bad2", masks=unstructured_masks, processor=processor, max_steps=1,
                 packed_base=True, **FAST)


def test_language_model_finetunes_on_a_text_file(tmp_path, processor):
    """A pruned Llama with its tokenizer, on a .txt corpus (windows of max_length tokens, every token scored, as
    the LoRA recovery of Wanda / SparseGPT): the examples are the windows, the loss goes down, and every pruned
    weight stays zero in the merged model."""
    from factories import magnitude_pruned, tiny_llama
    from transformers import LlamaForCausalLM

    model = tiny_llama(seed=2)
    masks = magnitude_pruned(model, "2:4", ("language",))
    tokenizer = processor.tokenizer
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:6]
    (tmp_path / "corpus.txt").write_text(" ".join(words[i % 6] for i in range(320)))  # a cycle: easy to learn
    windows = len(tokenizer((tmp_path / "corpus.txt").read_text(), add_special_tokens=False)["input_ids"]) // 16
    record = finetune(model, str(tmp_path / "corpus.txt"), tmp_path / "run", masks=masks, processor=tokenizer,
                      max_steps=8, max_length=16, **{**FAST, "batch_size": 4})
    assert record["num_examples"] == windows >= 16
    losses = [e["loss"] for e in record["losses"]]
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0], losses
    assert record["mask_check"]["ok"] and record["sparsity_after"]["all"] == pytest.approx(0.5)
    weights = _reload(tmp_path / "run" / "merged", LlamaForCausalLM)
    assert sum(_pruned_zeros_exact(weights, masks).values()) == 0
