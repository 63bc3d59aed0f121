"""Perplexity of a model's language model on a text: ``exp(mean NLL per predicted token)``.

The text is tokenised once (ids ``t_0 .. t_{n-1}``); windows of ``max_length`` tokens slide by ``stride``; each
window scores only the tokens not scored by the previous window, with the window's earlier tokens (up to
``max_length - stride`` of them) as context, so every token after the first is predicted exactly once and
``num_tokens = n - 1``.

Causal language model (LLaVA, or the OPT / Llama inside BLIP-2 / InstructBLIP): the window is the input and
token ``t_i`` is scored by the logits at position ``i - 1``. ``stride`` defaults to ``max_length``.

Encoder-decoder language model (Flan-T5 inside BLIP-2 / InstructBLIP, or a T5 model): the window's context
``t_a .. t_{b-1}`` followed by the language model's EOS (as T5 tokenizers end every input) is the encoder
input, and the decoder, teacher-forced from its start token, predicts the scored tokens ``t_b .. t_{e-1}``:
``NLL = -sum_i log p(t_i | encoder(t_a..t_{b-1}, eos), t_b..t_{i-1})``. The first window's context is ``t_0``.
``stride`` defaults to ``max_length // 2``, so that the encoder reads half a window of text (with
``stride = max_length`` it would read one token, and pruning damage to the encoder would barely show).
The numbers are comparable between a dense model and its pruned / finetuned versions with the same
settings, not with a causal model's perplexity.

``max_length`` above the language model's position limit (``max_position_embeddings`` or ``n_positions`` of its
config; OPT's learned positions fail past it) is capped to that limit with a logged warning; the result records
the window and stride used.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import cpu_gemm
from ..models import decoder_start_token_id

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_file", "perplexity_of_folder", "language_model_of",
           "max_positions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    num_tokens: int
    max_length: int | None = None
    stride: int | None = None

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "num_tokens": self.num_tokens,
                "max_length": self.max_length, "stride": self.stride}


def language_model_of(model: Any) -> Any:
    """The module that maps ``input_ids`` to next-token logits: a separate language model inside a VLM (BLIP-2 /
    InstructBLIP ``language_model`` with an LM head: causal, or T5 encoder-decoder), else the model itself (LLaVA
    accepts text alone)."""
    inner = getattr(model, "language_model", None)
    if inner is not None and hasattr(inner, "get_output_embeddings") and inner.get_output_embeddings() is not None:
        return inner
    return model


def max_positions(lm: Any) -> int | None:
    """The most tokens the language model ``lm`` reads at once (``max_position_embeddings`` or ``n_positions``
    of its text config); ``None`` for an encoder-decoder (T5: relative positions) or when the config has none."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _window_nll(lm: Any, window: torch.Tensor, first: int) -> torch.Tensor:
    """NLL (nats) of ``window[first:]`` given ``window[:first]`` (1-D ids, ``first >= 1``): a vector of
    ``len(window) - first`` values (see the module docstring for the two kinds of language model)."""
    targets = window[first:]
    start = decoder_start_token_id(lm)
    if start is None:
        logits = lm(input_ids=window.unsqueeze(0)).logits[0, first - 1:-1].float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    config = lm.config
    context = window[:first]
    if config.eos_token_id is not None:
        context = torch.cat([context, context.new_tensor([config.eos_token_id])])
    decoder = torch.cat([targets.new_tensor([start]), targets[:-1]])
    logits = lm(input_ids=context.unsqueeze(0), decoder_input_ids=decoder.unsqueeze(0)).logits[0].float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str, max_length: int = 128, stride: int | None = None) -> PerplexityResult:
    """Perplexity of ``model``'s language model on ``text`` (see the module docstring); ``stride`` defaults to
    ``max_length`` for a causal language model and ``max_length // 2`` for an encoder-decoder one."""
    lm = language_model_of(model)
    limit = max_positions(lm)
    if limit is not None and max_length > limit:
        logger.warning("perplexity: max_length %d is above the language model's %d positions; using %d",
                       max_length, limit, limit)
        max_length = limit
        if stride is not None and stride > limit:
            stride = limit
    if stride is None:
        stride = max(1, max_length // 2) if decoder_start_token_id(lm) is not None else max_length
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride <= max_length, got max_length={max_length}, stride={stride}")
    _check_text(text)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"perplexity: the text has {ids.numel()} token(s); at least 2 are needed")
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    total_nll, counted, scored_until = 0.0, 0, 1  # token 0 is never predicted
    start = 0
    try:
        # float32 CPU linears on oneDNN where it measures faster (SmolLM2-135M, 14.5k tokens, 2 threads: 25 -> 15 s)
        with cpu_gemm.onednn_linears(lm):
            while scored_until < ids.numel():
                end = min(start + max_length, ids.numel())
                nll = _window_nll(lm, ids[start:end].to(device), scored_until - start)
                total_nll += float(nll.sum())
                counted += nll.numel()
                scored_until = end
                start = min(start + stride, end - 1)  # the next window must predict token `end`
    finally:
        lm.train(was_training)
    mean = total_nll / counted
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, num_tokens=counted, max_length=max_length,
                            stride=stride)


def _check_text(text: str) -> None:
    if not text.strip():
        raise ValueError("perplexity: the text is empty")


def perplexity_of_file(model: Any, tokenizer: Any, path: str | os.PathLike, max_length: int = 128,
                       stride: int | None = None) -> PerplexityResult:
    """:func:`perplexity` of the text in ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return perplexity(model, tokenizer, f.read(), max_length, stride)


def perplexity_of_folder(model_dir: str | os.PathLike, path: str | os.PathLike, max_length: int = 128,
                         stride: int | None = None) -> PerplexityResult:
    """:func:`perplexity` of the model saved in ``model_dir`` (any folder :func:`vlmsparse.pipeline.save.load_model`
    opens: dense, pruned, finetuned or compressed) on the text in ``path`` (UTF-8), with the tokenizer saved
    beside it (a processor's tokenizer). The text is read before the model loads, so a missing or empty file fails
    first; a folder without a tokenizer is a ValueError."""
    # not at import: the pipeline pulls in the kernels
    from ..pipeline.save import check_model_folder, load_model, load_processor

    with open(path, encoding="utf-8") as f:
        text = f.read()
    _check_text(text)
    check_model_folder(model_dir)  # config and weights first: a bare folder has no tokenizer either
    processor = load_processor(model_dir)
    if processor is None:
        raise ValueError(f"{model_dir}: no tokenizer saved in the folder; perplexity needs one")
    model = load_model(model_dir)
    return perplexity(model, getattr(processor, "tokenizer", processor), text, max_length, stride)
