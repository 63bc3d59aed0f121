"""prune_model on tiny LLaVA / BLIP-2 / InstructBLIP / Llama / OPT / Mllama: exact sparsity on exactly the asked
modules, sequential calibration equal to a full-model reference, shared statistics, padding, OWL, errors, save/load,
the blocks a forward skips (Mllama's cross-attention layers on text)."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import (
    blip2_inputs,
    blip2_t5_inputs,
    instructblip_inputs,
    llava_inputs,
    mllama_inputs,
    text_inputs,
    tiny_blip2,
    tiny_blip2_t5,
    tiny_instructblip,
    tiny_instructblip_t5,
    tiny_llama,
    tiny_llava,
    tiny_mllama,
    tiny_opt,
)
from torch import nn

from vlmsparse.masks import MaskSet
from vlmsparse.models import prunable_linear_names
from vlmsparse.pipeline.prune import (
    PruneConfig,
    allocation_with_parts,
    format_report,
    not_pruned_of,
    prune_model,
    report_of,
)
from vlmsparse.pipeline.prune.plan import _plan
from vlmsparse.pipeline.prune.statistics import _collect_stats
from vlmsparse.pipeline.save import load_pruned, save_pruned
from vlmsparse.pruning import InputStats, outlier_ratio, owl_sparsities, wanda_prune
from vlmsparse.sparsity import build_mask, num_pruned, satisfies_nm

MODELS = {
    "llava": (tiny_llava, llava_inputs),
    "blip2": (tiny_blip2, blip2_inputs),
}


def _text_only(batch):
    return {k: v for k, v in batch.items() if k != "pixel_values"}


def _check_pruned(model, original, masks, names, pattern, method):
    """Exactly ``names`` pruned, each to exactly ``pattern``; every other parameter bit-identical."""
    assert list(masks) == names
    modules = dict(model.named_modules())
    asked = pattern
    for name in names:
        pattern = masks.patterns[name] if asked == "mixed" else asked
        mask = masks[name]
        weight = modules[name].weight.detach()
        assert torch.equal(weight != 0, mask), name
        assert not torch.signbit(weight[~mask]).any(), name  # +0.0, not -0.0
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            assert satisfies_nm(mask, n, m)
            assert int((~mask).sum()) == mask.numel() * (m - n) // m
        elif method == "sparsegpt" or masks.patterns[name] != pattern:
            assert int((~mask).sum()) == num_pruned(mask.numel(), float(masks.patterns[name])), name
        else:
            # magnitude / Wanda: per row in the language model, per matrix in the vision encoder
            rows = (~mask).sum(dim=1)
            if (rows == num_pruned(mask.shape[1], float(pattern))).all():
                continue
            assert int((~mask).sum()) == num_pruned(mask.numel(), float(pattern)), name
    pruned = {f"{n}.weight" for n in names}
    for key, value in model.state_dict().items():
        if key not in pruned:
            assert torch.equal(value, original[key]), f"{key} changed"


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_every_method_and_pattern(arch, method, pattern):
    build, inputs = MODELS[arch]
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_model(model, method=method, sparsity=pattern, calibration=[inputs(seed=1)], progress=False)
    _check_pruned(model, original, masks, prunable_linear_names(model), pattern, method)
    assert masks.method == method and all(p == pattern for p in masks.patterns.values())


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    "allocation, parts",
    [
        ("equal", ("vision", "language")),
        ("language", ("language",)),
        ("vision", ("vision",)),
        ({"vision": "2:4", "language": 0.7}, ("vision", "language")),
    ],
)
def test_allocations(arch, allocation, parts):
    build, inputs = MODELS[arch]
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_model(model, method="sparsegpt", sparsity=0.5, allocation=allocation,
                        calibration=[inputs(seed=2)], progress=False)
    names = prunable_linear_names(model, parts=parts)
    if isinstance(allocation, dict):
        for name in names:
            part = "vision" if name in prunable_linear_names(model, parts="vision") else "language"
            assert masks.patterns[name] == str(allocation[part])
        _check_pruned(model, original, masks, names, "mixed", "sparsegpt")
    else:
        _check_pruned(model, original, masks, names, "0.5", "sparsegpt")


def test_connector_by_option():
    model = tiny_llava()
    masks = prune_model(model, method="wanda", allocation={"connector": 0.5}, calibration=[llava_inputs()],
                        progress=False)
    assert list(masks) == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    assert prunable_linear_names(model, parts="connector", include_non_default=True) == list(masks)
    assert abs(masks.sparsity() - 0.5) < 1e-9


def test_instructblip_qformer_skips_instruction_padding():
    """InstructBLIP's Q-Former reads [queries; instruction]: Wanda statistics of its linears (self-attention,
    text FFN) from one right-padded batch equal those from the same rows unpadded, one per batch."""
    inputs = instructblip_inputs(batch=2)
    padded = dict(inputs)
    qmask = torch.ones(2, 5, dtype=torch.long)
    qmask[1, 3:] = 0
    padded["qformer_input_ids"] = inputs["qformer_input_ids"].masked_fill(qmask == 0, 0)
    padded["qformer_attention_mask"] = qmask
    rows = []
    for row, length in ((0, 5), (1, 3)):
        single = {k: v[row:row + 1] for k, v in padded.items()}
        single["qformer_input_ids"] = single["qformer_input_ids"][:, :length]
        single["qformer_attention_mask"] = single["qformer_attention_mask"][:, :length]
        rows.append(single)

    def prune(calibration):
        return prune_model(tiny_instructblip(), method="wanda", allocation={"connector": 0.5},
                           calibration=calibration, progress=False)

    one_batch, per_row = prune([padded]), prune(rows)
    names = list(one_batch)
    assert any(n.endswith("attention.attention.query") for n in names)
    assert any(n.endswith(".intermediate.dense") for n in names) and any(n.endswith("layer.0.output.dense") for n in names)
    assert any(n.endswith("crossattention.attention.key") for n in names)
    assert list(per_row) == names
    differ = [n for n in names if not torch.equal(one_batch[n], per_row[n])]
    assert differ == []


def _dense_block_input_norm(model, dense, block, module, batches, use_mask):
    """Wanda's input norm of ``module`` from ordinary full-model forwards of the pruned ``model`` with ``block``
    made dense again (the pipeline collects a block's statistics while the block is still dense), padding
    skipped with the batch's attention_mask when ``use_mask``; the model is left as it was."""
    pruned_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(block + ".")}
    model.load_state_dict({k: dense[k] for k in pruned_state}, strict=False)
    stats = InputStats(module.in_features)
    state = {}

    def hook(_module, args):
        stats.add_batch(args[0], token_mask=state["mask"] if use_mask else None)

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                state["mask"] = b["attention_mask"]
                model(**b, use_cache=False)
    finally:
        handle.remove()
        model.load_state_dict(pruned_state, strict=False)
    return stats.norm


@pytest.mark.parametrize("arch", ["llava", "llama"])
def test_sequential_calibration_matches_full_model_reference(arch):
    """Each block is calibrated on the outputs of the already-pruned blocks before it, batches are
    independent (no KV cache carried over) and padding is skipped: the Wanda masks of the second block equal
    those computed from inputs captured by hooks in ordinary forwards of the final pruned model."""
    build = tiny_llava if arch == "llava" else tiny_llama
    model = build()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [llava_inputs(seed=s) for s in (3, 4)]
    batches[1]["attention_mask"][0, -3:] = 0  # right padding in one row
    batches[0]["attention_mask"][1, :1] = 0  # left padding
    if arch == "llama":
        batches = [_text_only(b) for b in batches]
    masks = prune_model(model, method="wanda", sparsity=0.5, calibration=batches, progress=False)
    prefix = "model.language_model.layers.1" if arch == "llava" else "model.layers.1"
    checks = {f"{prefix}.self_attn.q_proj": "row", f"{prefix}.mlp.down_proj": None}
    if arch == "llava":
        checks["model.vision_tower.encoder.layers.1.self_attn.q_proj"] = "matrix"
    modules = dict(model.named_modules())
    for name, scope in checks.items():
        # the pipeline computed all statistics of a block in one pass with the block still dense:
        # reproduce that by making the block of ``name`` dense again (earlier blocks stay pruned)
        block = ".".join(name.split(".")[: name.split(".").index("1") + 1])
        norm = _dense_block_input_norm(model, dense, block, modules[name], batches, use_mask="vision" not in name)
        _, expected = wanda_prune(dense[f"{name}.weight"], norm, 0.5, scope=scope or "row")
        assert torch.equal(masks[name], expected), name


def test_linears_reading_the_same_input_share_statistics():
    model = tiny_llama()
    from vlmsparse.models import get_arch_spec
    from vlmsparse.pipeline.prune.capture import _capture

    spec = get_arch_spec(model)
    stages = spec.resolve(model)
    (stage, per_block), = _plan(spec, stages, PruneConfig())
    captured = _capture(model, stage, [_text_only(llava_inputs())], torch.device("cpu"), None)
    stats, group_of, _ = _collect_stats(stage.blocks[0], 0, per_block[0], captured, torch.device("cpu"),
                                        False, 0, False, None)
    p = "model.layers.0."
    assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.k_proj"] is stats[p + "self_attn.v_proj"]
    assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
    distinct = {id(stats[p + n]) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert len(distinct) == 4
    assert len(set(group_of.values())) == 4


def test_padding_tokens_do_not_change_the_masks():
    model_a, model_b = tiny_llama(), tiny_llama()
    short = _text_only(llava_inputs(batch=1, seed=5))
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :4]) + (0 if k == "attention_mask" else 7)], dim=1)
              for k, v in short.items()}
    a = prune_model(model_a, method="sparsegpt", sparsity=0.5, calibration=[short], progress=False)
    b = prune_model(model_b, method="sparsegpt", sparsity=0.5, calibration=[padded], progress=False)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(dict(model_a.named_modules())[name].weight,
                                   dict(model_b.named_modules())[name].weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "build, inputs",
    [(tiny_instructblip, instructblip_inputs), (tiny_opt, llava_inputs), (tiny_blip2_t5, blip2_t5_inputs)],
)
def test_other_architectures_and_generate(build, inputs):
    model = build()
    batch = inputs(seed=6)
    if build is tiny_opt:
        batch = _text_only(batch)
    masks = prune_model(model, method="sparsegpt", sparsity="2:4", calibration=[batch], progress=False)
    assert list(masks) == prunable_linear_names(model) and abs(masks.sparsity() - 0.5) < 1e-9
    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.logits).all()
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == batch["input_ids"].shape[0]


def test_pruned_vlm_runs_forward_and_generate():
    model = tiny_llava()
    batch = llava_inputs(seed=7)
    prune_model(model, method="wanda", sparsity=0.7, calibration=[batch], progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_owl_spreads_sparsity_around_the_target():
    model = tiny_llama(layers=4)
    batch = _text_only(llava_inputs(seed=8))
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1,
                        calibration=[batch], progress=False)
    per_block = {}
    for name, pattern in masks.patterns.items():
        per_block.setdefault(name.split(".")[2], set()).add(float(pattern))
    values = [v.pop() for v in per_block.values() if len(v) == 1]
    assert len(values) == 4  # one sparsity per block
    assert max(values) - min(values) == pytest.approx(0.2, abs=1e-6)
    assert sum(values) / 4 == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="N:M"):
        prune_model(tiny_llama(), method="wanda", sparsity="2:4", allocation="owl", calibration=[batch])


class _NotALinear(nn.Module):
    """``F.linear`` with a linear's weight and bias, not an ``nn.Linear``: prune_model does not target it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _llama_with_an_untargeted_block(untargeted: int) -> nn.Module:
    """A 4-block tiny Llama whose block ``untargeted`` holds no ``nn.Linear`` (so no pruning targets)."""
    model = tiny_llama(seed=5, layers=4)
    block = model.model.layers[untargeted]
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, _NotALinear(module))
    return model


def test_owl_runs_a_block_without_targets_and_leaves_it_out_of_the_spread():
    """OWL's dense pre-pass on a Llama whose block 1 has no targets: the blocks after it see its outputs, and the
    sparsities spread over the pruned blocks only, equal to those from the Wanda scores of ordinary full-model
    forwards of the dense model (a reference that runs every block). The non-OWL path runs the block too."""
    batches = [_text_only(llava_inputs(seed=s)) for s in (11, 12)]
    batches[1]["attention_mask"][0, -2:] = 0
    threshold, lam, target = 2.0, 0.1, 0.5
    model = _llama_with_an_untargeted_block(1)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [0, 2, 3]
    linears = {i: {n: m for n, m in model.model.layers[i].named_modules() if isinstance(m, nn.Linear)}
               for i in blocks}
    stats = {(i, n): InputStats(m.in_features) for i in blocks for n, m in linears[i].items()}
    state = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, key=(i, n): stats[key].add_batch(
        args[0], token_mask=state["mask"])) for i in blocks for n, m in linears[i].items()]
    with torch.no_grad():
        for b in batches:
            state["mask"] = b["attention_mask"]
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    ratios = [outlier_ratio([m.weight.abs() * stats[i, n].norm.unsqueeze(0) for n, m in linears[i].items()],
                            threshold) for i in blocks]
    expected = owl_sparsities(ratios, target, lam)
    assert len(set(ratios)) == len(blocks)  # distinct ratios: a spread that inputs or a missing block would change

    masks = prune_model(model, method="wanda", sparsity=target, allocation="owl", owl_lambda=lam,
                        owl_threshold=threshold, calibration=batches, progress=False)
    assert not any(name.startswith("model.layers.1.") for name in masks)
    for i, s in zip(blocks, expected):
        for n in linears[i]:
            name = f"model.layers.{i}.{n}"
            assert float(masks.patterns[name]) == pytest.approx(s, abs=1e-6), name
            assert int((~masks[name]).sum(dim=1)[0]) == num_pruned(masks[name].shape[1], float(masks.patterns[name]))
    for key, value in model.state_dict().items():
        if key.startswith("model.layers.1."):
            assert torch.equal(value, dense[key]), key

    # the non-OWL path: block 2 is calibrated on block 1's outputs (reference: full-model forwards)
    model = _llama_with_an_untargeted_block(1)
    masks = prune_model(model, method="wanda", sparsity=target, calibration=batches, progress=False)
    name = "model.layers.2.self_attn.q_proj"
    norm = _dense_block_input_norm(model, dense, "model.layers.2", model.get_submodule(name), batches, True)
    assert torch.equal(masks[name], wanda_prune(dense[f"{name}.weight"], norm, target, scope="row")[1])


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_reported_errors_wanda_and_magnitude_on_a_sample_sparsegpt_on_all(method, monkeypatch):
    """Wanda and magnitude keep no X^T X for the error report (on SmolLM2 it cost as much as the pruning): a
    linear's error is ||X D^T|| / ||X W^T|| over the first whole calibration sequences that hold ERROR_SAMPLE_TOKENS
    real tokens. SparseGPT, which needs X^T X, reports it over every token. In the dense order each linear's inputs are the dense model's, so the errors equal those from
    inputs captured in ordinary forwards of the dense model (padding skipped)."""
    import vlmsparse.pipeline.prune.driver as driver
    import vlmsparse.pruning.stats as stats_module

    monkeypatch.setattr(driver, "ERROR_SAMPLE_TOKENS", 23)  # batch 0's 12 + 10 real tokens, batch 1's first 12
    grams = []
    gram_add = stats_module.gram_add_
    monkeypatch.setattr(stats_module, "gram_add_", lambda gram, x: grams.append(x.shape) or gram_add(gram, x))
    model = tiny_llama(layers=2)
    dense = copy.deepcopy(model)
    batches = [text_inputs(model, seed=s) for s in (1, 2)]
    masks = prune_model(model, method=method, sparsity="2:4", calibration=batches, propagate="dense", progress=False)
    assert bool(grams) == (method == "sparsegpt")
    inputs: dict[str, list[torch.Tensor]] = {}
    state = {}
    modules, pruned = dict(dense.named_modules()), dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(
        lambda _, args, name=name: inputs.setdefault(name, []).append(args[0][state["mask"]])) for name in masks]
    with torch.no_grad():
        for b in batches:
            state["mask"] = b["attention_mask"].bool()
            dense(**b, use_cache=False)
    for h in handles:
        h.remove()
    errors = {r.name: r.error for r in report_of(masks)}
    over = ("every calibration token" if method == "sparsegpt"
            else "the first whole calibration sequences reaching 23 tokens (all, when fewer)")
    assert f"error: ||X (W - W')^T|| / ||X W^T|| over {over}" in format_report(masks).splitlines()
    for name in masks:
        x = torch.cat(inputs[name] if method == "sparsegpt" else [inputs[name][0], inputs[name][1][:12]]).double()
        w, new = modules[name].weight.detach().double(), pruned[name].weight.detach().double()
        expected = float((x @ (w - new).T).norm() / (x @ w.T).norm())
        assert errors[name] == pytest.approx(expected, rel=1e-4), name


def test_report_and_mask_round_trip(tmp_path):
    model = tiny_llava()
    masks = prune_model(model, method="sparsegpt", sparsity=0.5, calibration=[llava_inputs()], progress=False)
    rows = report_of(masks)
    assert [r.name for r in rows] == list(masks)
    assert all(r.error is not None and 0 < r.error < 1 for r in rows)
    assert "overall sparsity" in format_report(masks)
    out = save_pruned(model, masks, tmp_path / "pruned")
    loaded, masks2 = load_pruned(out)
    assert list(masks2) == list(masks) and masks2.method == "sparsegpt"
    for name in masks:
        assert torch.equal(masks2[name], masks[name])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileExistsError):
        save_pruned(model, masks, out)
    save_pruned(model, masks, out, overwrite=True)
    with pytest.raises(ValueError, match="input model"):
        save_pruned(loaded, masks, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    # a weight non-zero where the mask prunes is refused
    name = next(iter(masks))
    bad = MaskSet({n: torch.zeros_like(m) if n == name else m for n, m in masks.items()})
    with pytest.raises(ValueError, match="non-zero"):
        save_pruned(model, bad, tmp_path / "other")


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_input_changes_nothing():
    model = tiny_llava()
    before = _weights(model)
    batch = llava_inputs()
    with pytest.raises(ValueError, match="divisible by 5"):
        prune_model(model, method="wanda", sparsity="3:5", calibration=[batch])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_model(model, method="wanda", sparsity=1.2, calibration=[batch])
    with pytest.raises(ValueError, match="empty"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[])
    with pytest.raises(ValueError, match="unknown method"):
        prune_model(model, method="obs", sparsity=0.5, calibration=[batch])
    with pytest.raises(ValueError, match="unknown part"):
        prune_model(model, allocation={"audio": 0.5}, calibration=[batch])
    with pytest.raises(ValueError, match="propagate: got 'input'; allowed: pruned, dense"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[batch], propagate="input")
    with pytest.raises(TypeError, match=r"unknown option\(s\) nsamples; allowed: .*blocksize"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[batch], nsamples=4)
    with pytest.raises(TypeError, match=r"calibration is one batch .*e.g. \[batch\]"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=batch)
    no_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="image tokens .* but the batch has no pixel_values"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[no_pixels])
    wrong = dict(batch, input_ids=batch["input_ids"][:, 2:])  # image tokens cut: 16 expected per image
    with pytest.raises(ValueError, match="image tokens"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[wrong])
    with pytest.raises(ValueError, match="no vision part"):
        prune_model(tiny_llama(), allocation="vision", calibration=[_text_only(batch)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # BLIP-2 ignores the image without image tokens
    blip = tiny_blip2()
    text = blip2_inputs()
    text["input_ids"] = text["input_ids"][:, 4:]
    text["attention_mask"] = text["attention_mask"][:, 4:]
    with pytest.raises(ValueError, match="no image tokens"):
        prune_model(blip, method="wanda", sparsity=0.5, calibration=[text])
    # NaN weights: refused before anything changes
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[batch])
    # unknown architecture
    with pytest.raises(ValueError, match="supported"):
        prune_model(torch.nn.Linear(4, 4), calibration=[batch])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llava.*ArchSpec"):
        prune_model(gpt2, calibration=[batch])


def test_nan_activations_restore_weights():
    model = tiny_llama()
    before = _weights(model)
    with torch.no_grad():  # block 1's input becomes NaN only after block 0 runs
        model.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.full((32,), float("nan")))
    before["model.layers.0.mlp.down_proj.bias"] = model.model.layers[0].mlp.down_proj.bias.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        prune_model(model, method="wanda", sparsity=0.5, calibration=[_text_only(llava_inputs())], progress=False)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key


def test_per_matrix_scope_in_vision_by_default():
    model = tiny_llava()
    masks = prune_model(model, method="magnitude", sparsity=0.5, progress=False)  # no calibration needed
    name = "model.vision_tower.encoder.layers.0.mlp.fc1"
    weight = dict(model.named_modules())[name].weight
    assert masks[name].sum() == weight.numel() // 2
    assert masks.info["calibration_batches"] == "0"
    reference_row = build_mask(torch.randn(4, 4), 0.5)
    assert reference_row.sum() == 8


@pytest.mark.parametrize("build, inputs", [(tiny_llava, llava_inputs), (tiny_blip2, blip2_inputs)])
def test_language_stage_gets_the_attention_mask_and_vision_none(build, inputs):
    """Padding can only be skipped if the language blocks' token positions line up with attention_mask."""
    from vlmsparse.models import get_arch_spec
    from vlmsparse.pipeline.prune.capture import _capture

    model = build()
    batch = inputs()
    for stage in get_arch_spec(model).resolve(model):
        if stage.part == "connector":
            continue
        (captured,) = _capture(model, stage, [batch], torch.device("cpu"), torch.device("cpu"))
        if stage.part == "language":
            assert torch.equal(captured.token_mask, batch["attention_mask"].bool())
        else:
            assert captured.token_mask is None


def test_offloaded_activations_give_the_same_result():
    a, b = tiny_llava(), tiny_llava()
    batch = llava_inputs(seed=9)
    ma = prune_model(a, method="sparsegpt", sparsity=0.5, calibration=[batch], progress=False, offload=True)
    mb = prune_model(b, method="sparsegpt", sparsity=0.5, calibration=[batch], progress=False, offload=False)
    for name in ma:
        assert torch.equal(ma[name], mb[name])


def _q_proj_calls(model, **options) -> list[int]:
    """How often each decoder block's ``q_proj`` ran while ``model`` was pruned with ``options``."""
    calls = [0] * len(model.model.layers)
    handles = [layer.self_attn.q_proj.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.model.layers)]
    prune_model(model, progress=False, **options)
    for h in handles:
        h.remove()
    return calls


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_propagation_runs_each_block_once_per_batch(method):
    model = tiny_llama(layers=3)
    batches = [text_inputs(model, seed=s) for s in (1, 2)]
    options = dict(method=method, sparsity="2:4", calibration=batches)
    assert _q_proj_calls(copy.deepcopy(model), propagate="dense", **options) == [2, 2, 2]
    # the reference order: statistics, then the pruned block again for the next block's inputs (not after the last)
    assert _q_proj_calls(model, **options) == [4, 4, 2]


def test_dense_propagation_calibrates_the_language_model_on_the_dense_vision_tower():
    """With ``propagate="dense"`` every stage's inputs are captured before any stage is pruned: the language
    masks do not depend on whether the vision tower is pruned too (Wanda's masks depend only on the inputs)."""
    batches = [llava_inputs(seed=s) for s in (1, 2)]
    options = dict(method="wanda", sparsity=0.5, calibration=batches, progress=False)
    alone = prune_model(tiny_llava(layers=3), allocation="language", propagate="dense", **options)
    both = prune_model(tiny_llava(layers=3), allocation="equal", propagate="dense", **options)
    after_vision = prune_model(tiny_llava(layers=3), allocation="equal", **options)
    assert set(alone) < set(both)
    assert all(torch.equal(both[name], alone[name]) for name in alone)
    assert any(not torch.equal(after_vision[name], alone[name]) for name in alone)


def test_t5_blocks_get_their_own_position_bias():
    """T5 blocks pass a position bias on from block 0; the pipeline captures every block's arguments. The
    Wanda masks of the second encoder and decoder blocks equal those from inputs captured in ordinary
    forwards of the pruned model (with that block made dense again)."""
    model = tiny_blip2_t5()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [blip2_t5_inputs(seed=s) for s in (10, 11)]
    batches[0]["attention_mask"][1, -2:] = 0
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="language", calibration=batches,
                        progress=False)
    modules = dict(model.named_modules())
    for block, name, use_mask in [
        ("language_model.encoder.block.1", "language_model.encoder.block.1.layer.0.SelfAttention.q", True),
        ("language_model.decoder.block.1", "language_model.decoder.block.1.layer.0.SelfAttention.q", False),
        ("language_model.decoder.block.1", "language_model.decoder.block.1.layer.2.DenseReluDense.wo", False),
    ]:
        norm = _dense_block_input_norm(model, dense, block, modules[name], batches, use_mask)
        _, expected = wanda_prune(dense[f"{name}.weight"], norm, 0.5)
        assert torch.equal(masks[name], expected), name


def _text_batches(model, seeds=(21, 22)):
    """Text-only batches (no pixel_values, no image tokens; the last row padded); an encoder-decoder language
    model's decoder reads the text shifted right behind its start token, as text calibration builds it."""
    batches = [text_inputs(model, seed=s) for s in seeds]
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "is_encoder_decoder", False):
        for b in batches:
            start = torch.full_like(b["input_ids"][:, :1], config.decoder_start_token_id)
            b["decoder_input_ids"] = torch.cat([start, b["input_ids"][:, :-1]], dim=1)
    return batches


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("build", [tiny_blip2, tiny_instructblip])
def test_text_calibration_of_a_blip_language_part_runs_the_language_model_alone(build, method):
    """BLIP-2's / InstructBLIP's forward needs pixel_values: a text batch calibrates the language part by running
    the language model alone. The masks and weights equal those of pruning that language model by itself on the
    same batches; exactly the language linears are pruned to 2:4; vision and connector are bit-identical."""
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    alone = copy.deepcopy(model.language_model)
    batches = _text_batches(model)
    masks = prune_model(model, method=method, sparsity="2:4", allocation="language", calibration=batches,
                        progress=False)
    expected = prune_model(alone, method=method, sparsity="2:4", calibration=batches, progress=False)
    assert list(masks) == [f"language_model.{n}" for n in expected]
    assert all(torch.equal(masks[f"language_model.{n}"], expected[n]) for n in expected)
    modules = dict(alone.named_modules())
    assert all(torch.equal(model.get_submodule(f"language_model.{n}").weight, modules[n].weight) for n in expected)
    _check_pruned(model, original, masks, prunable_linear_names(model, parts="language"), "2:4", method)
    assert masks.sparsity() == 0.5


@pytest.mark.parametrize("build", [tiny_blip2_t5, tiny_instructblip_t5])
def test_text_calibration_of_a_flan_t5_language_part(build):
    """BLIP-2 / InstructBLIP with Flan-T5: text batches with the decoder's inputs calibrate the encoder and the
    decoder (the language model run alone); the Wanda masks of their second blocks equal those from inputs
    captured in ordinary forwards of the pruned language model (that block made dense again); vision and
    connector are bit-identical."""
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    dense = {k.removeprefix("language_model."): v for k, v in original.items() if k.startswith("language_model.")}
    batches = _text_batches(model)
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="language", calibration=batches,
                        progress=False)
    _check_pruned(model, original, masks, prunable_linear_names(model, parts="language"), "0.5", "wanda")
    language = model.language_model
    for block, name, use_mask in [("encoder.block.1", "encoder.block.1.layer.0.SelfAttention.q", True),
                                  ("encoder.block.1", "encoder.block.1.layer.1.DenseReluDense.wo", True),
                                  ("decoder.block.1", "decoder.block.1.layer.0.SelfAttention.q", False),
                                  ("decoder.block.1", "decoder.block.1.layer.2.DenseReluDense.wo", False)]:
        norm = _dense_block_input_norm(language, dense, block, language.get_submodule(name), batches, use_mask)
        _, expected = wanda_prune(dense[f"{name}.weight"], norm, 0.5)
        assert torch.equal(masks[f"language_model.{name}"], expected), name


def test_text_batches_cannot_calibrate_a_vision_part():
    """A text batch never reaches the vision tower: pruning vision with calibration refuses it up front (naming
    pixel_values and the part), the model unchanged; magnitude with text batches (its error report) still runs."""
    model = tiny_blip2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _text_batches(model)
    with pytest.raises(ValueError, match="batch 0 has no pixel_values .* cannot calibrate the vision part"):
        prune_model(model, method="wanda", sparsity="2:4", calibration=batches, progress=False)
    with pytest.raises(ValueError, match="batch 1 has no pixel_values .* cannot calibrate the connector"):
        prune_model(model, method="sparsegpt", allocation={"language": "2:4", "connector": 0.5},
                    calibration=[blip2_inputs(), *batches[1:]], progress=False)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    masks = prune_model(model, method="magnitude", sparsity="2:4", calibration=batches, progress=False)
    assert set(masks) == set(prunable_linear_names(model)) and masks.sparsity() == 0.5
    errors = {r.name: r.error for r in report_of(masks)}
    assert all(errors[n] is not None for n in prunable_linear_names(model, parts="language"))
    assert all(errors[n] is None for n in prunable_linear_names(model, parts="vision"))


def test_t5_cross_attention_statistics_skip_encoder_padding():
    """The decoder's cross-attention k/v read the encoder output: their statistics skip the encoder's padding
    (``attention_mask``), not the decoder's (``decoder_attention_mask``). Their Wanda masks equal those from
    ||x_j|| over the real encoder tokens, captured in ordinary forwards of the pruned model; the decoder's own
    linears keep the decoder mask."""
    model = tiny_blip2_t5()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [blip2_t5_inputs(seed=s) for s in (12, 13)]
    for b, row, pad in [(batches[0], 1, 4), (batches[1], 0, 3)]:  # right padding of the encoder text
        b["attention_mask"][row, -pad:] = 0
        b["input_ids"][row, -pad:] = 0
    batches[1]["decoder_attention_mask"] = torch.ones_like(batches[1]["decoder_input_ids"])
    batches[1]["decoder_attention_mask"][1, -2:] = 0
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="language", calibration=batches,
                        progress=False)
    modules = dict(model.named_modules())
    for i in (0, 1):
        block = f"language_model.decoder.block.{i}"
        checks = {f"{block}.layer.1.EncDecAttention.k": "attention_mask",
                  f"{block}.layer.1.EncDecAttention.v": "attention_mask",
                  f"{block}.layer.1.EncDecAttention.q": "decoder_attention_mask"}
        pruned_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(block + ".")}
        model.load_state_dict({k: dense[k] for k in pruned_state}, strict=False)
        stats = {name: InputStats(modules[name].in_features) for name in checks}
        state = {}

        def make_hook(name, _stats=stats, _state=state, _checks=checks):
            def hook(module, args):
                _stats[name].add_batch(args[0], token_mask=_state["batch"].get(_checks[name]))

            return hook

        handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in checks]
        with torch.no_grad():
            for b in batches:
                state["batch"] = b
                model(**b, use_cache=False)
        for h in handles:
            h.remove()
        model.load_state_dict(pruned_state, strict=False)
        for name in checks:
            _, expected = wanda_prune(dense[f"{name}.weight"], stats[name].norm, 0.5)
            assert torch.equal(masks[name], expected), name


@pytest.mark.parametrize("allocation, sparsity, parts, present, expected", [
    ("equal", "0.5", {}, {"vision", "language"}, "equal"),
    ("owl", "0.5", {}, {"vision", "language"}, "owl"),
    ("equal", "2:4", {"connector": "0.5"}, {"vision", "connector", "language"},
     {"vision": "2:4", "language": "2:4", "connector": "0.5"}),
    ("equal", "2:4", {"language": "0.7"}, {"language"}, {"language": "0.7"}),  # a language model: no vision
    ("equal", "2:4", {"vision": "0"}, {"vision", "language"}, {"vision": "0", "language": "2:4"}),
    ("language", "0.6", {"vision": "2:4"}, {"vision", "language"}, {"language": "0.6", "vision": "2:4"}),
    ("vision", "2:4", {"connector": "0.7"}, {"vision", "connector", "language"}, {"vision": "2:4", "connector": "0.7"}),
])
def test_allocation_with_parts(allocation, sparsity, parts, present, expected):
    assert allocation_with_parts(allocation, sparsity, parts, present) == expected


def test_allocation_with_parts_refuses_owl_and_unknown_allocations():
    with pytest.raises(ValueError, match="allocation 'owl' cannot be combined with per-part patterns"):
        allocation_with_parts("owl", "0.5", {"vision": "0.5"}, {"vision", "language"})
    with pytest.raises(ValueError, match="unknown allocation 'most'; allowed: equal, language, vision, owl"):
        allocation_with_parts("most", "0.5", {"vision": "0.5"}, {"vision", "language"})


def test_a_part_at_0_that_the_model_lacks_is_ignored():
    """prune_model on a language model: a vision / connector pattern at 0 prunes what the allocation without it
    prunes; a non-zero one for a part the model lacks is refused."""
    batch = text_inputs(tiny_llama())
    expected = prune_model(tiny_llama(), method="wanda", sparsity="2:4", calibration=[batch], progress=False)
    for allocation in ({"language": "2:4", "vision": 0}, {"language": "2:4", "vision": "0%", "connector": "0"}):
        masks = prune_model(tiny_llama(), method="wanda", allocation=allocation, calibration=[batch], progress=False)
        assert list(masks) == list(expected) and all(torch.equal(masks[n], expected[n]) for n in masks)
    for allocation in ({"language": "2:4", "vision": 0.5}, {"connector": "2:4"}):
        with pytest.raises(ValueError, match="has no (vision|connector) part to prune; its parts: language"):
            prune_model(tiny_llama(), method="wanda", allocation=allocation, calibration=[batch], progress=False)


def test_needs_calibration():
    assert not PruneConfig(method="magnitude").needs_calibration
    assert PruneConfig(method="magnitude", allocation="owl").needs_calibration
    assert PruneConfig(method="magnitude", owl=True).needs_calibration
    assert PruneConfig(method="wanda").needs_calibration and PruneConfig(method="sparsegpt").needs_calibration


# ------------------------------------------------------------------ Mllama: cross-attention blocks and text batches
MLLAMA_CROSS = (1, 3)


def _mllama():
    """5 language blocks, cross-attention at 1 and 3: self-attention blocks before, between and after them."""
    return tiny_mllama(0, text_layers=5, cross_attention_layers=MLLAMA_CROSS)


def _language_linears(model, blocks):
    return [n for n in prunable_linear_names(model, parts="language")
            if int(n.split(".layers.")[1].split(".")[0]) in blocks]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_text_calibration_of_mllama_leaves_its_cross_attention_blocks_dense(method, caplog):
    """Mllama's forward skips its cross-attention blocks on text without pixel_values; the sequential pass does
    too: the self-attention blocks are pruned to exactly 2:4 (Wanda: each block's masks equal those from inputs
    captured in ordinary forwards of the pruned model, that block made dense again), the cross-attention blocks'
    linears stay dense (no inputs calibrate them: their keys / values read the image states), with a warning, in
    masks.info["not_pruned"] and in the report; every other weight is bit-identical."""
    model = _mllama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [text_inputs(model, seed=s) for s in (31, 32)]
    batches[0]["attention_mask"][0, :2] = 0  # left padding in one row (the last row's end is padded)
    with caplog.at_level("WARNING", logger="vlmsparse.pipeline.prune.driver"):
        masks = prune_model(model, method=method, sparsity="2:4", allocation="language", calibration=batches,
                            progress=False)
    pruned = _language_linears(model, (0, 2, 4))
    _check_pruned(model, original, masks, pruned, "2:4", method)
    assert masks.sparsity() == 0.5
    cross = [f"model.language_model.layers.{i}" for i in MLLAMA_CROSS]
    rows = not_pruned_of(masks)
    assert [r["block"] for r in rows] == cross and all(r["part"] == "language" for r in rows)
    assert [r["linears"] for r in rows] == [_language_linears(model, (i,)) for i in MLLAMA_CROSS]
    assert all(len(r["linears"]) == 7 and "skips this block" in r["reason"] for r in rows)
    warned = [r.getMessage() for r in caplog.records if "stay dense" in r.getMessage()]
    assert [m.split(":")[0] for m in warned] == cross and all("pixel_values" in m for m in warned)
    text = format_report(masks)
    assert all(f"left dense: {b} (7 language linears)" in text for b in cross)
    if method == "wanda":
        dense = original
        modules = dict(model.named_modules())
        for block in ("model.language_model.layers.2", "model.language_model.layers.4"):
            for name in (f"{block}.self_attn.q_proj", f"{block}.mlp.down_proj"):
                norm = _dense_block_input_norm(model, dense, block, modules[name], batches, True)
                _, expected = wanda_prune(dense[f"{name}.weight"], norm, "2:4")
                assert torch.equal(masks[name], expected), name
        # with an execution device (each block visits it; offloaded activations): the same masks and weights
        moved = _mllama()
        again = prune_model(moved, method=method, sparsity="2:4", allocation="language", calibration=batches,
                            device="cpu", offload=True, progress=False)
        assert list(again) == pruned and all(torch.equal(again[n], masks[n]) for n in pruned)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in moved.state_dict().items())
        assert again.info["not_pruned"] == masks.info["not_pruned"]
    with torch.no_grad():  # the pruned model still runs text and image-text forwards
        assert torch.isfinite(model(**batches[0], use_cache=False).logits).all()
        assert torch.isfinite(model(**mllama_inputs(model), use_cache=False).logits).all()


def test_mllama_text_calibration_with_magnitude_and_owl():
    """Magnitude needs no inputs: text batches (for its error report) prune the cross-attention blocks too, with no
    error reported for them. OWL on text: the cross-attention blocks get no outlier ratio and stay dense; the
    sparsities spread over the self-attention blocks."""
    batches = [text_inputs(_mllama(), seed=s) for s in (33, 34)]
    model = _mllama()
    masks = prune_model(model, method="magnitude", sparsity="2:4", allocation="language", calibration=batches,
                        progress=False)
    assert list(masks) == prunable_linear_names(model, parts="language") and masks.sparsity() == 0.5
    assert not_pruned_of(masks) == [] and "not_pruned" not in masks.info
    errors = {r.name: r.error for r in report_of(masks)}
    assert all(errors[n] is None for n in _language_linears(model, MLLAMA_CROSS))
    assert all(errors[n] is not None for n in _language_linears(model, (0, 2, 4)))

    model = _mllama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="language", owl=True, owl_lambda=0.1,
                        owl_threshold=2.0, calibration=batches, progress=False)
    assert list(masks) == _language_linears(model, (0, 2, 4))
    assert [r["block"] for r in not_pruned_of(masks)] == [f"model.language_model.layers.{i}" for i in MLLAMA_CROSS]
    spread = [float(masks.patterns[f"model.language_model.layers.{i}.self_attn.q_proj"]) for i in (0, 2, 4)]
    assert len(set(spread)) == 3 and sum(spread) / 3 == pytest.approx(0.5, abs=1e-5)
    pruned = {f"{n}.weight" for n in masks}
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items() if k not in pruned)


def test_mllama_image_and_text_batches_calibrate_cross_attention_on_the_image_batches():
    """Image-text and text batches together: every language linear is pruned; a cross-attention block's statistics
    come from the batches whose forward runs it (the image-text ones), the self-attention blocks' from all: the
    Wanda masks equal those from ordinary forwards of the pruned model (the block made dense again)."""
    model = _mllama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [mllama_inputs(model, seed=35), text_inputs(model, seed=36)]
    masks = prune_model(model, method="wanda", sparsity=0.5, allocation="language", calibration=batches,
                        progress=False)
    assert list(masks) == prunable_linear_names(model, parts="language") and not_pruned_of(masks) == []
    modules = dict(model.named_modules())
    for block, sub in [(1, "cross_attn.q_proj"), (1, "mlp.gate_proj"), (2, "self_attn.q_proj"), (3, "mlp.down_proj"),
                       (4, "self_attn.o_proj")]:
        name = f"model.language_model.layers.{block}.{sub}"
        norm = _dense_block_input_norm(model, dense, f"model.language_model.layers.{block}", modules[name], batches,
                                       True)
        assert torch.equal(masks[name], wanda_prune(dense[f"{name}.weight"], norm, 0.5)[1]), name


def test_pruned_weights_are_set_without_copying_into_the_loaded_storage():
    """``_set_weight``: the Parameter object stays (ties hold), its storage becomes the new values (no write into
    the old, possibly file-mapped, pages), a view of a larger tensor is copied rather than aliased, the version
    rises as after an in-place copy, and a mismatched dtype falls back to a copy."""
    from vlmsparse.pipeline.prune.driver import _set_weight

    shared = nn.Linear(4, 6, bias=False)
    tied = nn.Linear(4, 6, bias=False)
    tied.weight = shared.weight
    old_storage, version = shared.weight.data_ptr(), shared.weight._version
    stacked = torch.randn(10, 4)
    _set_weight(shared.weight, stacked[2:8])
    assert tied.weight is shared.weight and torch.equal(tied.weight, stacked[2:8])
    assert shared.weight.data_ptr() not in (old_storage, stacked[2:8].data_ptr())
    assert shared.weight._version > version and shared.weight.is_contiguous()
    transposed = torch.randn(4, 6).T
    _set_weight(shared.weight, transposed)
    assert torch.equal(shared.weight, transposed) and shared.weight.is_contiguous()
    kept = shared.weight.data_ptr()
    _set_weight(shared.weight, torch.ones(6, 4, dtype=torch.float64))
    assert shared.weight.dtype == torch.float32 and shared.weight.data_ptr() == kept and bool((shared.weight == 1).all())
