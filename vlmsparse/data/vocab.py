"""A word-level tokenizer and a LLaVA processor built in code (nothing downloaded), for the synthetic task.

The tokenizer is a ``tokenizers`` WordLevel model (lower-cased, split on whitespace and punctuation) wrapped
in ``transformers.PreTrainedTokenizerFast``; ids 0-4 are the special tokens ``<pad> <s> </s> <unk> <image>``.
The processor is a ``LlavaProcessor`` with a PIL CLIP image processor (no torchvision), which expands one
``<image>`` in the text into ``(image_size / patch_size) ** 2`` image tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import synthetic

__all__ = ["SPECIAL_TOKENS", "PROMPT_WORDS", "build_tokenizer", "build_processor"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# words of the prompt templates (vlmsparse.data.datasets) and of common instructions
PROMPT_WORDS = ("user", "assistant", "question", "answer", "short", "image", "caption", "describe", "this",
                "in", "one", "word", "\n")


def build_tokenizer(words: Iterable[str] | None = None):
    """A ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS`` + ``words`` (default: the synthetic vocabulary
    and :data:`PROMPT_WORDS`); ``bos`` is prepended, padding on the left (for generation)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if words is None:
        words = [*synthetic.vocabulary(), *PROMPT_WORDS]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        word = word.strip().lower()
        if word and word not in vocab:
            vocab[word] = len(vocab)
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    return tokenizer


def build_processor(image_size: int = 32, patch_size: int = 8, tokenizer=None):
    """A ``LlavaProcessor``: PIL CLIP image processor resizing to ``image_size`` (no crop beyond it) and the
    word-level tokenizer; ``<image>`` expands to ``(image_size // patch_size) ** 2`` tokens (CLS dropped,
    ``vision_feature_select_strategy="default"``)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
