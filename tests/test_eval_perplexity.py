"""Perplexity: equals exp(HF loss) when one window holds the text; every token scored once with windows."""

from __future__ import annotations

import math

import pytest
import torch
from factories import tiny_llama, tiny_llava

from vlmsparse.data.vocab import build_tokenizer
from vlmsparse.eval.perplexity import language_model_of, perplexity, perplexity_of_file

TEXT = "a red circle at the top left and a blue square at the bottom right . " * 3


def test_perplexity_matches_model_loss_in_one_window():
    model, tok = tiny_llama(), build_tokenizer()
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    result = perplexity(model, tok, TEXT, max_length=512)
    assert result.num_tokens == ids.shape[1] - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("max_length, stride", [(8, 8), (8, 3), (16, 1), (2, 2)])
def test_windows_score_every_token_once(max_length, stride):
    model, tok = tiny_llama(), build_tokenizer()
    n = len(tok(TEXT)["input_ids"])
    result = perplexity(model, tok, TEXT, max_length=max_length, stride=stride)
    assert result.num_tokens == n - 1
    assert math.isfinite(result.perplexity) and result.perplexity > 1.0


def test_windows_with_overlap_give_more_context_than_none():
    # with stride 1 each token sees max_length - 1 tokens of context: same as one big window when
    # max_length covers the text, so the two agree exactly
    model, tok = tiny_llama(), build_tokenizer()
    n = len(tok(TEXT)["input_ids"])
    full = perplexity(model, tok, TEXT, max_length=n)
    assert perplexity(model, tok, TEXT, max_length=n, stride=1).nll == pytest.approx(full.nll, rel=1e-6)


def test_llava_uses_whole_model_for_text(tmp_path):
    model, tok = tiny_llava(), build_tokenizer()
    assert language_model_of(model) is model
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    result = perplexity_of_file(model, tok, path, max_length=32)
    assert result.num_tokens == len(tok(TEXT)["input_ids"]) - 1


def test_bad_arguments():
    model, tok = tiny_llama(), build_tokenizer()
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, max_length=8, stride=9)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "   ")
