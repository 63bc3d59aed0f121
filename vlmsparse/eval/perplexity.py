"""Perplexity of a model's language model on a text: ``exp(mean NLL per predicted token)``.

The text is tokenised once; windows of ``max_length`` tokens slide by ``stride``; each window scores only
the tokens not scored by the previous window (with up to ``max_length - stride`` tokens of context before
them), so every token after the first is predicted exactly once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PerplexityResult", "perplexity", "language_model_of"]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    num_tokens: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "num_tokens": self.num_tokens}


def language_model_of(model: Any) -> Any:
    """The module that maps ``input_ids`` to next-token logits: a separate causal LM inside a VLM (BLIP-2 /
    InstructBLIP ``language_model`` with an LM head), else the model itself (LLaVA accepts text alone)."""
    inner = getattr(model, "language_model", None)
    if inner is not None and hasattr(inner, "get_output_embeddings") and inner.get_output_embeddings() is not None:
        return inner
    return model


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, text: str, max_length: int = 128, stride: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see the module docstring); ``stride`` defaults to ``max_length``."""
    stride = max_length if stride is None else stride
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride <= max_length, got max_length={max_length}, stride={stride}")
    if not text.strip():
        raise ValueError("perplexity: the text is empty")
    lm = language_model_of(model)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"perplexity: the text has {ids.numel()} token(s); at least 2 are needed")
    total_nll, counted, scored_until = 0.0, 0, 1  # token 0 is never predicted
    start = 0
    while scored_until < ids.numel():
        end = min(start + max_length, ids.numel())
        window = ids[start:end].unsqueeze(0).to(device)
        logits = lm(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        first = scored_until - start - 1  # index into targets of the first token not yet scored
        total_nll += float(nll[first:].sum())
        counted += nll.numel() - first
        scored_until = end
        start = min(start + stride, end - 1)  # the next window must predict token `end`
    lm.train(was_training)
    mean = total_nll / counted
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, num_tokens=counted)


def perplexity_of_file(model: Any, tokenizer: Any, path: str | os.PathLike, max_length: int = 128,
                       stride: int | None = None) -> PerplexityResult:
    """:func:`perplexity` of the text in ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return perplexity(model, tokenizer, f.read(), max_length, stride)
