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


def pruned_tiny(kind: str = "llava", pattern: str = "0.5", seed: int = 0, keep_dense: bool = False):
    """A tiny LLaVA / BLIP-2 whose vision and language block linears are magnitude-pruned to ``pattern``:
    ``(model, MaskSet)``. Pruned entries are +0.0 unless ``keep_dense`` (then the weights stay dense and
    only the MaskSet records the pruning). The image token id is the synthetic processor's ``<image>``."""
    from vlmsparse.masks import MaskSet
    from vlmsparse.models import prunable_linear_names
    from vlmsparse.sparsity import build_mask

    model = tiny_llava(seed) if kind == "llava" else tiny_blip2(seed)
    model.config.image_token_index = 4  # "<image>" of vlmsparse.data.vocab
    masks = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in prunable_linear_names(model, ("vision", "language")):
            weight = modules[name].weight
            mask = build_mask(weight.abs(), pattern)
            if not keep_dense:
                weight.copy_(torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)))
            masks[name] = mask
    return model, MaskSet(masks=masks, patterns={n: pattern for n in masks}, method="magnitude")


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
