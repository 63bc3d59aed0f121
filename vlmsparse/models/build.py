"""Building small Hugging Face VLMs from sizes (for the demo and for users who train from scratch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SmallLlavaSizes", "build_small_llava"]


@dataclass(frozen=True)
class SmallLlavaSizes:
    """Sizes of a LLaVA made of a CLIP-style vision tower (CLS dropped: ``(image_size / patch_size)^2`` image
    tokens), a 2-layer MLP projector and a Llama language model (MLP width 2x hidden in both towers)."""

    vocab_size: int
    image_token_id: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    init_std: float = 0.02
    max_positions: int = 128


def build_small_llava(sizes: SmallLlavaSizes, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` of ``sizes`` (weights drawn after
    ``torch.manual_seed(seed)``), with its generation config's special tokens set."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_hidden * 2,
        projection_dim=sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
    )
    text = LlamaConfig(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_hidden * 2,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=sizes.max_positions,
        pad_token_id=sizes.pad_token_id,
        bos_token_id=sizes.bos_token_id,
        eos_token_id=sizes.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=sizes.init_std,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=sizes.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=sizes.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = sizes.pad_token_id
    model.generation_config.eos_token_id = sizes.eos_token_id
    model.generation_config.bos_token_id = sizes.bos_token_id
    return model
