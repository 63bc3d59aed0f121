"""Tiny Hugging Face models built from configs in code (nothing is downloaded).

Dimensions are multiples of 16 so that N:M patterns (2:4, 4:8) and the packed 2:4 format apply to
every linear layer.
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 128
IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens for LLaVA
LLAVA_IMAGE_TOKEN = VOCAB - 1
BLIP_IMAGE_TOKEN = VOCAB - 1
NUM_QUERY_TOKENS = 4


def _vision(hidden: int = 32, layers: int = 2) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )


def tiny_llama_config(hidden: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_opt_config(hidden: int = 32, layers: int = 2) -> OPTConfig:
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        ffn_dim=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        word_embed_proj_dim=hidden,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llava(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlavaForConditionalGeneration:
    """LLaVA: CLIP vision tower (2 blocks) + projector + Llama (2 blocks); 16 image tokens."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision(hidden, layers)),
        text_config=tiny_llama_config(hidden, layers),
        image_token_index=LLAVA_IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def tiny_blip2(seed: int = 0, hidden: int = 32, layers: int = 2) -> Blip2ForConditionalGeneration:
    """BLIP-2: ViT (2 blocks) + Q-Former (1 layer, 4 queries) + OPT (2 blocks)."""
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=_vision(hidden, layers),
        qformer_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=hidden,
            vocab_size=VOCAB,
        ),
        text_config=tiny_opt_config(hidden, layers).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=BLIP_IMAGE_TOKEN,
    )
    return Blip2ForConditionalGeneration(config).eval()


def tiny_instructblip(seed: int = 0, hidden: int = 32, layers: int = 2) -> InstructBlipForConditionalGeneration:
    """InstructBLIP: ViT (2 blocks) + instruction-aware Q-Former + Llama (2 blocks)."""
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=_vision(hidden, layers),
        qformer_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=hidden,
            vocab_size=VOCAB,
        ),
        text_config=tiny_llama_config(hidden, layers).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=BLIP_IMAGE_TOKEN,
    )
    return InstructBlipForConditionalGeneration(config).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden, layers)).eval()


def tiny_opt(seed: int = 0, hidden: int = 32, layers: int = 2) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(tiny_opt_config(hidden, layers)).eval()


def llava_inputs(batch: int = 2, text_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids with exactly NUM_PATCHES image tokens per row, pixel_values, attention_mask."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 2, (batch, text_len), generator=g)
    image = torch.full((batch, NUM_PATCHES), LLAVA_IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
    }


def blip2_inputs(batch: int = 2, text_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids with NUM_QUERY_TOKENS image tokens first (BLIP-2 ignores the image without them)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 2, (batch, text_len), generator=g)
    image = torch.full((batch, NUM_QUERY_TOKENS), BLIP_IMAGE_TOKEN)
    input_ids = torch.cat([image, text], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
    }


# ------------------------------------------------------------------------------- finetuning helpers
def synthetic_processor(kind: str = "llava"):
    """The word-level processor of ``vlmsparse.data.vocab`` (LLaVA), or a Blip2Processor over the same
    tokenizer (``kind="blip2"``, NUM_QUERY_TOKENS image tokens prepended)."""
    from vlmsparse.data.vocab import build_processor

    processor = build_processor(image_size=IMAGE_SIZE, patch_size=PATCH)
    if kind == "llava":
        return processor
    from transformers import Blip2Processor

    return Blip2Processor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                          num_query_tokens=NUM_QUERY_TOKENS)


def magnitude_pruned(model, pattern: str, parts: tuple[str, ...] = ("vision", "language"), keep_dense: bool = False):
    """Magnitude-prune the block linears of ``model``'s ``parts`` to ``pattern`` in place; returns their
    ``MaskSet``. Pruned entries become +0.0 unless ``keep_dense`` (then only the MaskSet records the pruning)."""
    from vlmsparse.masks import MaskSet
    from vlmsparse.models import prunable_linear_names
    from vlmsparse.sparsity import build_mask

    masks = {}
    with torch.no_grad():
        for name in prunable_linear_names(model, parts):
            weight = model.get_submodule(name).weight
            masks[name] = build_mask(weight.abs(), pattern)
            if not keep_dense:
                weight.masked_fill_(~masks[name], 0)
    return MaskSet(masks=masks, patterns={n: pattern for n in masks}, method="magnitude")


def pruned_tiny(kind: str = "llava", pattern: str = "0.5", seed: int = 0, keep_dense: bool = False):
    """A tiny LLaVA / BLIP-2 whose vision and language block linears are magnitude-pruned to ``pattern``:
    ``(model, MaskSet)`` (see :func:`magnitude_pruned`). The image token id is the synthetic processor's
    ``<image>``."""
    model = tiny_llava(seed) if kind == "llava" else tiny_blip2(seed)
    model.config.image_token_index = 4  # "<image>" of vlmsparse.data.vocab
    return model, magnitude_pruned(model, pattern, keep_dense=keep_dense)


def save_blip2_folder(folder, model):
    """Save a tiny BLIP-2 ``model`` (OPT or Flan-T5) with the synthetic processor to ``folder``, its image token id
    set to the processor's ``<image>``; returns ``folder``."""
    processor = synthetic_processor("blip2")
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def instructblip_inputs(batch: int = 2, text_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """BLIP-2-style inputs plus the instruction for the Q-Former (qformer_input_ids, qformer_attention_mask)."""
    inputs = blip2_inputs(batch, text_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    qformer_ids = torch.randint(3, VOCAB - 2, (batch, 5), generator=g)
    inputs["qformer_input_ids"] = qformer_ids
    inputs["qformer_attention_mask"] = torch.ones_like(qformer_ids)
    return inputs


def tiny_blip2_t5(seed: int = 0, hidden: int = 32, layers: int = 2) -> Blip2ForConditionalGeneration:
    """BLIP-2 with a Flan-T5-style encoder-decoder language model (gated-GELU, 2 + 2 blocks)."""
    from transformers import T5Config

    torch.manual_seed(seed)
    t5 = T5Config(
        vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 2, d_ff=hidden * 2, num_layers=layers,
        num_decoder_layers=layers, num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        feed_forward_proj="gated-gelu",
    )
    config = Blip2Config(
        vision_config=_vision(hidden, layers),
        qformer_config=dict(
            hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=2,
            encoder_hidden_size=hidden, vocab_size=VOCAB,
        ),
        text_config=t5.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=BLIP_IMAGE_TOKEN,
    )
    return Blip2ForConditionalGeneration(config).eval()


def blip2_t5_inputs(batch: int = 2, text_len: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """blip2_inputs plus decoder_input_ids (start token 0, then text) for the T5 decoder."""
    inputs = blip2_inputs(batch, text_len, seed)
    g = torch.Generator().manual_seed(seed + 2)
    decoder = torch.randint(3, VOCAB - 2, (batch, 4), generator=g)
    inputs["decoder_input_ids"] = torch.cat([torch.zeros(batch, 1, dtype=torch.long), decoder], dim=1)
    return inputs


# ------------------------------------------------------------------------------ encoder-decoder / InstructBLIP
def tiny_t5_config(hidden: int = 32, layers: int = 2):
    """A Flan-T5-style config (gated-GELU, untied head) sharing the synthetic ids: pad = decoder start = 0,
    eos = 2."""
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 2, d_ff=hidden * 2, num_layers=layers,
        num_decoder_layers=layers, num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )


def tiny_instructblip_t5(seed: int = 0, hidden: int = 32, layers: int = 2) -> InstructBlipForConditionalGeneration:
    """InstructBLIP with a Flan-T5-style encoder-decoder language model (2 + 2 blocks)."""
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=_vision(hidden, layers),
        qformer_config=dict(
            hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=2,
            encoder_hidden_size=hidden, vocab_size=VOCAB,
        ),
        text_config=tiny_t5_config(hidden, layers).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=BLIP_IMAGE_TOKEN,
    )
    return InstructBlipForConditionalGeneration(config).eval()


def synthetic_instructblip_processor():
    """An InstructBlipProcessor over the word-level tokenizer of ``vlmsparse.data.vocab`` (NUM_QUERY_TOKENS
    ``<image>`` tokens prepended); the Q-Former tokenizer is a second copy of it (left padding, on purpose:
    the evaluation must right-pad the Q-Former instruction itself)."""
    from transformers import InstructBlipProcessor

    from vlmsparse.data.vocab import build_processor, build_tokenizer

    processor = build_processor(image_size=IMAGE_SIZE, patch_size=PATCH)
    return InstructBlipProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                 qformer_tokenizer=build_tokenizer(), num_query_tokens=NUM_QUERY_TOKENS)


# ------------------------------------------------------------------------------- model coverage (issue 16)
# One builder per architecture with an explicit spec in vlmsparse.models.specs; every width a multiple of 16.
# MODEL_COVERAGE maps a name to (build(seed) -> model, inputs(model, batch, seed) -> model inputs) for
# tests/test_model_coverage.py. Image token id 127 (VOCAB - 1); 125 / 126 are the other special image ids.
def _lm_kwargs(hidden: int = 32, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def _causal(config_name: str, class_name: str, **extra):
    import transformers

    def build(seed: int = 0):
        torch.manual_seed(seed)
        config = getattr(transformers, config_name)(**_lm_kwargs(**extra))
        return getattr(transformers, class_name)(config).eval()

    return build


def text_inputs(model, batch: int = 2, seed: int = 0, length: int = 12) -> dict[str, torch.Tensor]:
    """Random text (ids 3 .. VOCAB - 4, no image tokens) with the last row's final 2 positions padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 4, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _vision_kwargs(hidden: int = 32) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=PATCH)


def tiny_llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**_vision_kwargs()), text_config=tiny_llama_config(),
                             image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]],
                             image_token_index=VOCAB - 1, vision_feature_layer=-1)
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_llava_onevision(seed: int = 0):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**_vision_kwargs()),
                                  text_config=Qwen2Config(**_lm_kwargs()),
                                  image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]],
                                  image_token_index=VOCAB - 1, vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def _qwen_vl(class_name: str, vision: dict):
    import transformers

    def build(seed: int = 0):
        torch.manual_seed(seed)
        text = _lm_kwargs(rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]))
        config_cls = getattr(transformers, class_name.replace("ForConditionalGeneration", "Config"))
        config = config_cls(vision_config=vision, text_config=text, image_token_id=VOCAB - 1,
                            vision_start_token_id=VOCAB - 3, video_token_id=VOCAB - 2)
        return getattr(transformers, class_name)(config).eval()

    return build


tiny_qwen2_vl = _qwen_vl("Qwen2VLForConditionalGeneration",
                         dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                              spatial_merge_size=2, temporal_patch_size=2))
tiny_qwen2_5_vl = _qwen_vl("Qwen2_5_VLForConditionalGeneration",
                           dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                                patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                                fullatt_block_indexes=[1]))  # block 0: 2x2 windows of the 4x4 patches


def _idefics3(class_name: str):
    import transformers

    def build(seed: int = 0):
        torch.manual_seed(seed)
        config_cls = getattr(transformers, class_name.replace("ForConditionalGeneration", "Config"))
        config = config_cls(vision_config=_vision_kwargs(), text_config=_lm_kwargs(), scale_factor=2,
                            image_token_id=VOCAB - 1)
        return getattr(transformers, class_name)(config).eval()

    return build


tiny_idefics3 = _idefics3("Idefics3ForConditionalGeneration")
tiny_smolvlm = _idefics3("SmolVLMForConditionalGeneration")


def tiny_paligemma(seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    config = PaliGemmaConfig(vision_config=_vision_kwargs(), text_config=dict(model_type="gemma",
                             **_lm_kwargs(head_dim=16)), projection_dim=32, image_token_index=VOCAB - 1)
    return PaliGemmaForConditionalGeneration(config).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(vision_config=_vision_kwargs(), text_config=_lm_kwargs(head_dim=16), mm_tokens_per_image=4,
                          image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    return Gemma3ForConditionalGeneration(config).eval()


MLLAMA_TILES = 2


def tiny_mllama(seed: int = 0, text_layers: int = 3, cross_attention_layers: tuple[int, ...] = (1,)):
    """Mllama: local (2) + global (1) vision blocks, projector, ``text_layers`` language blocks (by default 3, block 1
    cross-attention)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, max_num_tiles=MLLAMA_TILES, intermediate_layers_indices=[0],
                  vision_output_dim=64, supported_aspect_ratios=[[1, 1], [1, 2]])
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                num_attention_heads=2, num_key_value_heads=2, cross_attention_layers=list(cross_attention_layers),
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1)
    return MllamaForConditionalGeneration(config).eval()


def _with_image_tokens(batch: int, per_image: int, g: torch.Generator, text_len: int = 6,
                       before: tuple[int, ...] = (), after: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """``[text0, *before, image token x per_image, *after, text...]`` per row, the last row's end padded."""
    text = torch.randint(3, VOCAB - 4, (batch, text_len), generator=g)
    image = torch.tensor([*before, *([VOCAB - 1] * per_image), *after]).expand(batch, -1)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def llava_next_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image_sizes = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch)
    pixels = _pixels(g, batch, 2, 3, IMAGE_SIZE, IMAGE_SIZE)  # base image + one tile of the 32x32 grid
    features = model.model.get_image_features(pixels, image_sizes).pooler_output
    out = _with_image_tokens(batch, features[0].shape[0], g)
    return {**out, "pixel_values": pixels, "image_sizes": image_sizes}


def qwen_vl_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One 32x32 image per row: a 1 x 4 x 4 grid of 8x8 patches (x2 frames), 4 tokens after the 2x2 merge."""
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    grid = torch.tensor([[1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH]] * batch)
    dim = 3 * vision.temporal_patch_size * PATCH * PATCH
    pixels = _pixels(g, batch * int(grid[0].prod()), dim)
    per_image = int(grid[0].prod()) // vision.spatial_merge_size ** 2
    out = _with_image_tokens(batch, per_image, g, before=(VOCAB - 3,))
    out["mm_token_type_ids"] = (out["input_ids"] == VOCAB - 1).long()  # 1: image token (M-RoPE positions)
    return {**out, "pixel_values": pixels, "image_grid_thw": grid}


def idefics3_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One 32x32 image per row: 16 patches, 4 tokens after the pixel shuffle (scale factor 2)."""
    g = torch.Generator().manual_seed(seed)
    pixels = _pixels(g, batch, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = _with_image_tokens(batch, NUM_PATCHES // model.config.scale_factor ** 2, g)
    return {**out, "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(batch, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)}


def paligemma_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """PaliGemma: the image tokens first, then the text (token_type_ids 0 on the prefix, as the processor)."""
    g = torch.Generator().manual_seed(seed)
    out = _with_image_tokens(batch, NUM_PATCHES, g)
    ids = out["input_ids"]
    out["input_ids"] = torch.cat([ids[:, 1:NUM_PATCHES + 1], ids[:, :1], ids[:, NUM_PATCHES + 1:]], dim=1)
    token_types = torch.zeros_like(out["input_ids"])
    token_types[:, -3:] = 1  # the suffix (answer) the loss is on; the prefix attends both ways
    return {**out, "pixel_values": _pixels(g, batch, 3, IMAGE_SIZE, IMAGE_SIZE), "token_type_ids": token_types}


def gemma3_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = _with_image_tokens(batch, model.config.mm_tokens_per_image, g, before=(VOCAB - 3,), after=(VOCAB - 2,))
    return {**out, "pixel_values": _pixels(g, batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


def mllama_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image per row as one tile (aspect ratio 1x1, id 1); one <|image|> token; the text after it attends
    to the tile (cross_attention_mask [B, L, images, tiles])."""
    g = torch.Generator().manual_seed(seed)
    out = _with_image_tokens(batch, 1, g)
    length = out["input_ids"].shape[1]
    cross = torch.zeros(batch, length, 1, MLLAMA_TILES, dtype=torch.long)
    cross[:, 1:, :, 0] = 1
    return {**out, "pixel_values": _pixels(g, batch, 1, MLLAMA_TILES, 3, IMAGE_SIZE, IMAGE_SIZE),
            "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
            "aspect_ratio_mask": torch.tensor([[[1, 0]]] * batch), "cross_attention_mask": cross}


def tiny_internvl(seed: int = 0):
    """InternVL (no explicit spec in vlmsparse: found structurally): InternViT (2 blocks) + MLP + Qwen2 (2 blocks)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH, PATCH])
    config = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **_lm_kwargs()),
                            image_token_id=VOCAB - 1, downsample_ratio=0.5)
    return InternVLForConditionalGeneration(config).eval()


def internvl_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One 32x32 image per row: 16 patches, 4 tokens after the pixel shuffle (downsample ratio 0.5)."""
    g = torch.Generator().manual_seed(seed)
    out = _with_image_tokens(batch, NUM_PATCHES // 4, g)
    return {**out, "pixel_values": _pixels(g, batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


# architectures without an explicit spec, found structurally (vlmsparse.models.structural_spec)
STRUCTURAL_ONLY = ("granite", "internvl")

MODEL_COVERAGE = {
    "qwen2": (_causal("Qwen2Config", "Qwen2ForCausalLM"), text_inputs),
    "qwen3": (_causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), text_inputs),
    "mistral": (_causal("MistralConfig", "MistralForCausalLM"), text_inputs),
    "gemma": (_causal("GemmaConfig", "GemmaForCausalLM", head_dim=16), text_inputs),
    "gemma2": (_causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=16), text_inputs),
    "gemma3_text": (_causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16), text_inputs),
    "phi3": (_causal("Phi3Config", "Phi3ForCausalLM"), text_inputs),
    "llava_next": (tiny_llava_next, llava_next_inputs),
    "llava_onevision": (tiny_llava_onevision, llava_next_inputs),
    "qwen2_vl": (tiny_qwen2_vl, qwen_vl_inputs),
    "qwen2_5_vl": (tiny_qwen2_5_vl, qwen_vl_inputs),
    "idefics3": (tiny_idefics3, idefics3_inputs),
    "smolvlm": (tiny_smolvlm, idefics3_inputs),
    "paligemma": (tiny_paligemma, paligemma_inputs),
    "gemma3": (tiny_gemma3, gemma3_inputs),
    "mllama": (tiny_mllama, mllama_inputs),
    "granite": (_causal("GraniteConfig", "GraniteForCausalLM"), text_inputs),
    "internvl": (tiny_internvl, internvl_inputs),
}


def synthetic_llava_next_processor():
    """A LlavaNextProcessor over the word-level tokenizer of ``vlmsparse.data.vocab`` (``<image>`` = id 4) and a
    PIL LLaVA-NeXT image processor (32x32 tiles, the grid pinpoints of :func:`tiny_llava_next`): it expands
    ``<image>`` to as many tokens as the model makes image features and returns ``image_sizes``."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from vlmsparse.data.vocab import build_tokenizer

    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE],
                                                                       [IMAGE_SIZE, 2 * IMAGE_SIZE]])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


def tiny_gemma3_text_mixed(seed: int = 0):
    """Gemma 3 text with a sliding-window block (window 4) then a full-attention block: each gets its own
    attention mask and rotary embedding from the model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**_lm_kwargs(head_dim=16), sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()
