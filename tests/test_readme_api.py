"""README.md's "Python API" section, run as a user runs it: the ten-line block on local folders (relative
paths, a LLaVA folder with its processor, calibration batches = processor outputs, a conversation JSON with
image files), the "own training loop" lines and every lower-level name the section lists.

Outcomes checked: masks exact after every step (``weight != 0`` equals the mask, bit for bit), logits of each
loaded model equal to those of the model saved, sparsity numbers (0.5 per part for 2:4).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import peft
import pytest
import torch
from factories import synthetic_processor, tiny_llava
from PIL import Image
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vlmsparse
from vlmsparse import ops
from vlmsparse.kernels.cpu import native_available
from vlmsparse.masks import MASKS_FILENAME
from vlmsparse.models import prunable_linear_names
from vlmsparse.modules.sparse_linear import SparseLinear
from vlmsparse.pruning import InputStats
from vlmsparse.sparse24 import pack24, semi_structured_support, unpack24
from vlmsparse.sparsity import build_mask, check_pattern, parse_pattern

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["USER: <image>\nwhat color is the object? ASSISTANT:", "USER: <image>\nis there a circle? ASSISTANT:"]
QA = [("what color is the object?", "red"), ("how many shapes are there?", "two"),
      ("what shape is on the left?", "circle"), ("is there a square?", "yes")]
PROJECTOR = "model.multi_modal_projector.linear_1.weight"  # a connector weight: never pruned


# ------------------------------------------------------------------------------------------- the user's files
@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """What a user has before the README block: ``llava-dense/`` (a LLaVA folder with its processor), four
    images and ``train.json`` (LLaVA conversation format) referring to them."""
    root = tmp_path_factory.mktemp("readme")
    model = tiny_llava(seed=0)
    model.config.image_token_index = 4  # "<image>" of the synthetic processor
    model.save_pretrained(root / "llava-dense")
    synthetic_processor("llava").save_pretrained(root / "llava-dense")
    rng = np.random.default_rng(0)
    rows = []
    for i, (question, answer) in enumerate(QA):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _load_dense(user_dir):
    """``model, processor = ...``: the README's first line, with transformers."""
    model = LlavaForConditionalGeneration.from_pretrained(user_dir / "llava-dense").eval()
    processor = AutoProcessor.from_pretrained(user_dir / "llava-dense")
    return model, processor


def _batches(processor, user_dir):
    """Two calibration batches of two image prompts (left-padded: padding is part of real batches)."""
    images = [Image.open(user_dir / f"img{i}.png") for i in range(4)]
    return [processor(images=images[i:i + 2], text=PROMPTS, return_tensors="pt", padding=True) for i in (0, 2)]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _weights(model, names):
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def _assert_zeros_are_masks(model, masks):
    """Bit for bit: the non-zeros of every masked weight are exactly its mask's True entries."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(weight != 0, mask.to(weight.device)), name


def _is_24(mask: torch.Tensor) -> bool:
    """Exactly 2 kept in every group of 4 inputs."""
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


# ------------------------------------------------------------------------------------------- the README block
def test_readme_python_api_block(user_dir, monkeypatch):
    """The ten lines of the README, in order, with the README's relative folder names."""
    from vlmsparse.training import finetune

    monkeypatch.chdir(user_dir)
    model, processor = _load_dense(user_dir)
    batches = _batches(processor, user_dir)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    masks = vlmsparse.prune_model(model, method="wanda", sparsity="2:4",
                                  allocation="equal", calibration=batches)
    names = prunable_linear_names(model, ("vision", "language"))
    assert set(masks) == set(names) and len(masks) == 26  # 2 x 6 CLIP + 2 x 7 Llama linears
    assert all(_is_24(masks[n]) for n in masks) and masks.sparsity() == 0.5
    _assert_zeros_are_masks(model, masks)
    report = json.loads(masks.info["report"])
    assert {r["name"] for r in report} == set(masks) and all(r["sparsity"] == 0.5 for r in report)
    assert torch.equal(model.state_dict()[PROJECTOR], dense[PROJECTOR])  # "equal": vision + language only
    pruned_logits = _logits(model, batches[0])

    vlmsparse.save_pruned(model, masks, "llava-24", processor=processor)
    assert (user_dir / "llava-24" / MASKS_FILENAME).is_file() and (user_dir / "llava-24" / "model.safetensors").is_file()
    reloaded, reloaded_masks = vlmsparse.load_pruned("llava-24")
    assert torch.equal(_logits(reloaded, batches[0]), pruned_logits)
    assert set(reloaded_masks) == set(masks) and all(torch.equal(reloaded_masks[n], masks[n]) for n in masks)
    assert type(AutoProcessor.from_pretrained("llava-24")) is type(processor)  # the processor went along
    pruned = _weights(reloaded, masks)

    record = finetune("llava-24", "train.json", "restored", method="sparselora", distill_lambda=0.1, teacher="llava-dense")
    assert record["teacher"] == "llava-dense" and record["num_examples"] == 4
    assert record["steps"] == 1  # defaults: 1 epoch, batch size 4
    for entry in record["losses"]:
        assert entry["kl"] > 0 and entry["loss"] == pytest.approx(0.9 * entry["ce"] + 0.1 * entry["kl"], rel=1e-4)
    assert record["mask_check"] == {"ok": True, "required": True, "modules_violating": 0, "pruned_entries_nonzero": 0}
    parts = {"all": 0.5, "vision": 0.5, "language": 0.5}
    assert record["sparsity_before"] == parts and record["sparsity_after"] == parts and record["sparsity_lost"] == 0
    assert record["merged_model"] == "restored/merged"

    model, masks = vlmsparse.load_pruned("restored/merged")
    assert set(masks) == set(reloaded_masks) and all(torch.equal(masks[n], reloaded_masks[n]) for n in masks)
    _assert_zeros_are_masks(model, masks)  # "merged: zeros == masks, bit for bit"
    assert all(not torch.equal(w, pruned[n]) for n, w in _weights(model, masks).items())  # adapters merged
    state, before = model.state_dict(), reloaded.state_dict()
    unmasked = [k for k in state if k.removesuffix(".weight") not in masks]
    assert unmasked and all(torch.equal(state[k], before[k]) for k in unmasked)  # only masked linears changed
    restored_logits = _logits(model, batches[0])

    size = vlmsparse.save_compressed(model, "llava-24-packed", processor=processor, masks=masks)
    assert size["formats"]["packed24"] == 26 and size["ratio"] < 0.7
    assert size["stored_bytes"] < size["dense_bytes"]
    assert type(AutoProcessor.from_pretrained("llava-24-packed")) is type(processor)  # complete folder
    _, packed_masks = vlmsparse.load_pruned("llava-24-packed")
    assert all(torch.equal(packed_masks[n], masks[n]) for n in masks) and set(packed_masks) == set(masks)

    fast = vlmsparse.load_compressed("llava-24-packed", as_sparse=True, device="cpu")
    fast_swapped = {n for n, m in fast.named_modules() if isinstance(m, SparseLinear)}
    if native_available():  # on a CPU "auto" runs the 2:4 linears packed through the native kernels
        assert fast_swapped == set(masks)
        torch.testing.assert_close(_logits(fast, batches[0]), restored_logits, rtol=1e-5, atol=1e-5)
    else:  # without them "auto" finds no fast 2:4 path: the linears stay dense, the same weights bit for bit
        assert not fast_swapped
        assert torch.equal(_logits(fast, batches[0]), restored_logits)
    # backend="packed24" swaps them on any CPU (the native kernel, or the reference twin)
    packed = vlmsparse.load_compressed("llava-24-packed", as_sparse=True, device="cpu", backend="packed24")
    swapped = {n for n, m in packed.named_modules() if isinstance(m, SparseLinear)}
    assert swapped == set(masks) and all(packed.get_submodule(n).backend == "packed24" for n in swapped)
    torch.testing.assert_close(_logits(packed, batches[0]), restored_logits, rtol=1e-5, atol=1e-5)


def test_readme_prune_folder_line(user_dir, tmp_path, monkeypatch):
    """The commented ``prune_folder`` line of the block, as written, on a copy of the user's files: both steps
    (prune_model + save_pruned) from folders, calibrated on the conversation JSON's images and text."""
    import shutil

    for item in user_dir.iterdir():
        if item.name == "llava-dense" or item.name.startswith("img") or item.name == "train.json":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp_path / item.name)
    monkeypatch.chdir(tmp_path)
    dense = LlavaForConditionalGeneration.from_pretrained("llava-dense").state_dict()

    out, masks = vlmsparse.prune_folder("llava-dense", "llava-24", method="wanda", sparsity="2:4", calibration="train.json")
    assert out == (tmp_path / "llava-24").resolve() and masks.info["calibration_batches"] == "1"  # 4 records, batch size 8
    model, saved = vlmsparse.load_pruned("llava-24")
    assert set(saved) == set(masks) == set(prunable_linear_names(model, ("vision", "language"))) and len(masks) == 26
    assert all(_is_24(masks[n]) and torch.equal(saved[n], masks[n]) for n in masks)
    _assert_zeros_are_masks(model, masks)
    assert torch.equal(model.state_dict()[PROJECTOR], dense[PROJECTOR])
    assert type(AutoProcessor.from_pretrained("llava-24")) is type(AutoProcessor.from_pretrained("llava-dense"))


# --------------------------------------------------------------------------------------- your own training loop
def test_own_training_loop_add_and_merge_sparse_lora(user_dir):
    model, processor = _load_dense(user_dir)
    batches = _batches(processor, user_dir)
    masks = vlmsparse.prune_model(model, method="wanda", sparsity="2:4", calibration=batches)
    pruned = _weights(model, masks)

    vlmsparse.add_sparse_lora(model, masks, r={"language": 8, "vision": 4}, lora_alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in masks for ab in "AB"}  # only lora_A / lora_B train
    for name in masks:
        module = model.get_submodule(name)
        rank = 4 if "vision_tower" in name else 8
        assert isinstance(module, vlmsparse.SparseLoRALinear)
        assert (module.r, module.lora_alpha, module.scaling) == ({"default": rank}, {"default": 16}, {"default": 16 / rank})
        assert module.lora_A["default"].weight.shape == (rank, module.in_features)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    adapted = _logits(model, batches[0])

    vlmsparse.merge_sparse_lora(model)
    assert not any(isinstance(m, vlmsparse.SparseLoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in masks)  # plain nn.Linear
    _assert_zeros_are_masks(model, masks)  # "whose zeros equal the masks"
    assert all(not torch.equal(w, pruned[n]) for n, w in _weights(model, masks).items())
    torch.testing.assert_close(_logits(model, batches[0]), adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ lower-level pieces
def test_sparsity_patterns_and_masks():
    nm, unstructured, percent = parse_pattern("2:4"), parse_pattern(0.5), parse_pattern("70%")
    assert (nm.is_nm, nm.n, nm.m) == (True, 2, 4)
    assert not unstructured.is_nm and unstructured.sparsity == 0.5 and percent.sparsity == pytest.approx(0.7)
    scores = torch.rand(16, 32)
    mask = build_mask(scores, "2:4")
    assert _is_24(mask) and check_pattern(mask, "2:4") and not check_pattern(torch.ones(16, 32), "2:4")
    mask = build_mask(scores, "70%")
    assert check_pattern(mask, "70%") and int((~mask).sum(1).min()) == round(32 * 0.7)
    with pytest.raises(ValueError):
        parse_pattern("3:2")


def test_pack24_and_semi_structured_support():
    weight = torch.randn(64, 64, dtype=torch.float16)
    weight = weight.masked_fill(~build_mask(weight.abs(), "2:4"), 0)
    packed = pack24(weight)
    assert packed.values.shape == (64, 32) and packed.meta.dtype == torch.uint8  # values [out, in/2]
    assert torch.equal(unpack24(packed), weight)
    assert packed.nbytes() * 16 == weight.numel() * weight.element_size() * 9  # 9/16 of the fp16 bytes
    ok, why = semi_structured_support(weight)  # a CPU tensor: no
    assert not ok and "CUDA" in why
    assert semi_structured_support(weight, capability=(9, 0), backend="cusparselt") == (True, "ok (cusparselt)")
    ok, why = semi_structured_support(weight, capability=(7, 5), backend="cusparselt")
    assert not ok and "8.0" in why
    ok, why = semi_structured_support(torch.randn(64, 64, dtype=torch.float16), capability=(9, 0), backend="cusparselt")
    assert not ok and "not 2:4" in why
    ok, why = semi_structured_support(weight[:, :40], capability=(9, 0), backend="cutlass")
    assert not ok and "multiple of 32x64" in why


def test_prune_layer_is_what_prune_model_does_per_weight(user_dir):
    """``prune_layer`` (one weight + its calibration statistics) gives the mask ``prune_model`` gave the
    first vision and the first language q_proj (their inputs do not depend on their own block's pruning)."""
    model, processor = _load_dense(user_dir)
    batches = _batches(processor, user_dir)
    dense = copy.deepcopy(model)
    masks = vlmsparse.prune_model(model, method="wanda", sparsity="2:4", calibration=batches)
    for name in ("model.vision_tower.encoder.layers.0.self_attn.q_proj",
                 "model.language_model.layers.0.self_attn.q_proj"):
        linear = model.get_submodule(name)
        stats = InputStats(linear.in_features, hessian=True)
        vision = "vision_tower" in name
        for batch in batches:
            seen = []
            handle = linear.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
            _logits(model, batch)
            handle.remove()
            stats.add_batch(seen[0], None if vision else batch["attention_mask"])  # padding skipped
        result = vlmsparse.prune_layer(dense.get_submodule(name).weight.detach(), stats, "wanda", "2:4")
        assert torch.equal(result.mask, masks[name]), name
        assert torch.equal(result.weight, linear.weight.detach()) and result.error > 0


def test_sparse_lora_linear_has_peft_names():
    linear = nn.Linear(32, 16)
    mask = build_mask(linear.weight.abs(), "2:4")
    with torch.no_grad():
        linear.weight.masked_fill_(~mask, 0)
    original = linear.weight.detach().clone()
    module = vlmsparse.SparseLoRALinear(linear, mask, r=4, lora_alpha=8, init_lora_weights=False)
    assert module.base_layer is linear and (module.r, module.lora_alpha, module.scaling) == ({"default": 4}, {"default": 8},
                                                                                           {"default": 2.0})
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    assert A.shape == (4, 32) and B.shape == (16, 4)
    delta = module.get_delta_weight()
    torch.testing.assert_close(delta, (2.0 * B @ A).detach() * mask, rtol=0, atol=1e-6)
    assert bool((delta[~mask] == 0).all())
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = module(x)
        module.merge(safe_merge=True)
        assert module.merged and torch.equal(linear.weight != 0, mask)
        torch.testing.assert_close(module(x), y, rtol=1e-5, atol=1e-6)
        module.unmerge()
    assert not module.merged and torch.equal(linear.weight, original)
    with torch.no_grad():
        module.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        module.merge(safe_merge=True)
    assert not module.merged and torch.equal(linear.weight, original)


def test_teacher_mode_with_keep_dense_is_the_dense_network(user_dir):
    model, processor = _load_dense(user_dir)
    batches = _batches(processor, user_dir)
    dense_logits = _logits(model, batches[0])
    pruned = copy.deepcopy(model)
    masks = vlmsparse.prune_model(pruned, method="wanda", sparsity="2:4", calibration=batches)
    pruned_logits = _logits(pruned, batches[0])

    vlmsparse.add_sparse_lora(model, masks, r=8, keep_dense=True)  # dense weights kept, masks applied in forward
    torch.testing.assert_close(_logits(model, batches[0]), pruned_logits, rtol=1e-5, atol=1e-5)  # the student
    with vlmsparse.teacher_mode(model):
        assert torch.equal(_logits(model, batches[0]), dense_logits)  # the dense teacher, same network
    torch.testing.assert_close(_logits(model, batches[0]), pruned_logits, rtol=1e-5, atol=1e-5)  # student again

    vlmsparse.add_sparse_lora(pruned, masks, r=8)  # without keep_dense there is no dense weight to run
    with pytest.raises(ValueError, match="keep_dense=True"):
        with vlmsparse.teacher_mode(pruned):
            pass


def test_ops_backend_dispatcher(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.ENV_VAR == "VLMSPARSE_BACKEND" and ops.current_backend() == (None, "default")
    for name in ("triton", "reference", "torch24"):
        with ops.use_backend(name):
            assert ops.current_backend() == (name, "context")
    monkeypatch.setenv("VLMSPARSE_BACKEND", "reference")
    assert ops.current_backend() == ("reference", "env")
    with pytest.raises(ValueError, match="allowed: reference, triton, torch24"):
        with ops.use_backend("cuda"):
            pass
    # the chosen backend is what runs: triton cannot run a CPU tensor (without the interpreter) and says why
    linear = nn.Linear(8, 4)
    module = vlmsparse.SparseLoRALinear(linear, torch.ones(4, 8, dtype=torch.bool), r=2)
    with ops.use_backend("reference"):
        module(torch.randn(2, 8))
    if not ops._interpret():
        with ops.use_backend("triton"), pytest.raises(RuntimeError, match="use the 'reference' backend on CPU"):
            module(torch.randn(2, 8))


def test_peft_sparse_lora_config_save_load_merge(user_dir, tmp_path):
    model, processor = _load_dense(user_dir)
    batches = _batches(processor, user_dir)
    masks = vlmsparse.prune_model(model, method="wanda", sparsity="2:4", calibration=batches)
    vlmsparse.save_pruned(model, masks, tmp_path / "llava-24")

    peft_model = peft.get_peft_model(model, vlmsparse.sparse_lora_config(masks, r=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(masks) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name in trainable:
            if ".lora_B." in name:
                peft_model.get_parameter(name).normal_(0, 0.05)
    adapted = _logits(peft_model, batches[0])

    vlmsparse.save_sparse_lora(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / MASKS_FILENAME).is_file()
    base, base_masks = vlmsparse.load_pruned(tmp_path / "llava-24")
    loaded = vlmsparse.load_sparse_lora(base, tmp_path / "adapter", masks=base_masks)
    assert torch.equal(_logits(loaded, batches[0]), adapted)

    merged = loaded.merge_and_unload()
    _assert_zeros_are_masks(merged, masks)  # merge_and_unload keeps the sparsity
    torch.testing.assert_close(_logits(merged, batches[0]), adapted, rtol=1e-5, atol=1e-5)
