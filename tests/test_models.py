"""Architecture specs: parts of parameter / module names in both state-dict layouts, prunable linears, errors."""

from __future__ import annotations

import pytest
from factories import tiny_blip2, tiny_blip2_t5, tiny_instructblip, tiny_llama, tiny_llava, tiny_opt

from vlmsparse.models import (
    get_arch_spec,
    model_class_for,
    part_of,
    prunable_linear_names,
    supported_model_types,
)


@pytest.mark.parametrize(
    "name, model_type, part",
    [
        # transformers 5 module names
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj", "llava", "vision"),
        ("model.multi_modal_projector.linear_1.weight", "llava", "connector"),
        ("model.language_model.layers.3.mlp.down_proj.weight", "llava", "language"),
        ("lm_head.weight", "llava", "language"),
        # LLaVA-1.5 checkpoint keys (transformers 4 layout)
        ("vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight", "llava", "vision"),
        ("multi_modal_projector.linear_2.bias", "llava", "connector"),
        ("language_model.model.layers.0.self_attn.o_proj.weight", "llava", "language"),
        ("language_model.lm_head.weight", "llava", "language"),
        ("vision_model.encoder.layers.0.self_attn.qkv.weight", "blip-2", "vision"),
        ("qformer.encoder.layer.0.crossattention.attention.key.weight", "blip-2", "connector"),
        ("query_tokens", "blip-2", "connector"),
        ("language_projection.weight", "blip-2", "connector"),
        ("language_model.model.decoder.layers.1.fc2.weight", "blip-2", "language"),
        ("language_model.encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "blip-2", "language"),
        ("language_model.model.layers.0.mlp.up_proj", "instructblip", "language"),
        ("qformer.embeddings.word_embeddings.weight", "instructblip", "connector"),
        ("model.layers.0.self_attn.q_proj.weight", "llama", "language"),
        ("model.decoder.embed_tokens.weight", "opt", "language"),
        ("something.else", "llava", None),
    ],
)
def test_part_of(name, model_type, part):
    assert part_of(name, model_type) == part


def test_part_of_every_parameter_of_the_tiny_models():
    for build in (tiny_llava, tiny_blip2, tiny_instructblip, tiny_llama, tiny_opt):
        model = build()
        spec = get_arch_spec(model)
        for key in model.state_dict():
            part = part_of(key, model.config.model_type)
            assert part in ("vision", "connector", "language"), key
            assert spec.part_of(key) == part


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llava, blip-2"):
        part_of("h.0.attn.c_attn.weight", "gpt2")
    assert set(supported_model_types()) >= {"llava", "blip-2", "instructblip", "llama", "opt"}
    assert model_class_for("llava").__name__ == "LlavaForConditionalGeneration"


def test_prunable_linear_names_per_part():
    model = tiny_llava()
    vision = prunable_linear_names(model, parts="vision")
    language = prunable_linear_names(model, parts=["language"])
    assert len(vision) == 2 * 6 and len(language) == 2 * 7
    assert prunable_linear_names(model) == vision + language
    assert "lm_head" not in prunable_linear_names(model)
    assert prunable_linear_names(model, parts="connector") == []
    assert prunable_linear_names(model, parts="connector", include_non_default=True) == [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    with pytest.raises(ValueError, match="unknown part"):
        prunable_linear_names(model, parts="audio")
    blip = tiny_blip2()
    assert len(prunable_linear_names(blip, parts="language")) == 2 * 6
    assert all(n.startswith("qformer.") or n == "language_projection"
               for n in prunable_linear_names(blip, parts="connector", include_non_default=True))
    t5 = tiny_blip2_t5()
    names = prunable_linear_names(t5, parts="language")
    # encoder: q k v o wi_0 wi_1 wo = 7 per block; decoder adds cross-attention q k v o = 11 per block
    assert len(names) == 2 * 7 + 2 * 11
    for name in names:
        assert get_arch_spec(t5).part_of(name) == "language"


def test_vision_image_size():
    from factories import IMAGE_SIZE

    from vlmsparse.models import vision_image_size

    assert vision_image_size(tiny_llava()) == IMAGE_SIZE
    assert vision_image_size(tiny_llama()) == 336 and vision_image_size(tiny_llama(), default=64) == 64
