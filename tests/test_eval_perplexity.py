"""Perplexity: equals exp(HF loss) when one window holds the text; every token scored once with windows;
encoder-decoder (T5) language models: context to the encoder, scored tokens to the decoder."""

from __future__ import annotations

import math

import pytest
import torch
from factories import tiny_blip2_t5, tiny_instructblip_t5, tiny_llama, tiny_llava, tiny_t5_config

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


# ------------------------------------------------------------------------------------------ encoder-decoder
def _t5_loss(lm, context: list[int], targets: list[int]) -> tuple[float, int]:
    """Summed NLL of ``targets`` given the encoder input ``context + [eos]``, by the model's own loss (HF shifts
    the labels right with the decoder start token): ``(sum, count)``."""
    enc = torch.tensor([context + [lm.config.eos_token_id]])
    with torch.no_grad():
        loss = lm(input_ids=enc, labels=torch.tensor([targets])).loss
    return float(loss) * len(targets), len(targets)


def test_t5_perplexity_matches_model_loss_in_one_window():
    """One window: the encoder reads t_0 (+ eos), the decoder predicts t_1..t_{n-1}; equals exp(HF loss)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    lm, tok = T5ForConditionalGeneration(tiny_t5_config()).eval(), build_tokenizer()
    ids = tok(TEXT)["input_ids"]
    total, n = _t5_loss(lm, ids[:1], ids[1:])
    result = perplexity(lm, tok, TEXT, max_length=len(ids))
    assert result.num_tokens == len(ids) - 1 == n
    assert result.nll == pytest.approx(total / n, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


@pytest.mark.parametrize("build", [tiny_blip2_t5, tiny_instructblip_t5])
def test_t5_windows_put_the_context_in_the_encoder(build):
    """max_length 8, stride 4 (the default for an encoder-decoder): window 1 scores t_1..t_7 from t_0; then each
    window scores the next 4 tokens with the 4 before them as the encoder input. Through the VLM's T5."""
    model, tok = build(), build_tokenizer()
    lm = language_model_of(model)
    assert lm is model.language_model and lm.config.is_encoder_decoder
    ids = tok(TEXT)["input_ids"]
    parts = [_t5_loss(lm, ids[:1], ids[1:8])]
    parts += [_t5_loss(lm, ids[s - 4:s], ids[s:s + 4]) for s in range(8, len(ids), 4)]
    expected = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    result = perplexity(model, tok, TEXT, max_length=8)
    assert result.num_tokens == len(ids) - 1 == sum(p[1] for p in parts)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, TEXT, max_length=8, stride=4).nll == pytest.approx(expected, rel=1e-6)
    # a longer context in the encoder gives a different (not a silently equal) number
    assert perplexity(model, tok, TEXT, max_length=8, stride=8).nll != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("max_length, stride", [(8, 8), (8, 3), (16, 1), (2, 2), (2, 1)])
def test_t5_windows_score_every_token_once(max_length, stride):
    model, tok = tiny_blip2_t5(), build_tokenizer()
    n = len(tok(TEXT)["input_ids"])
    result = perplexity(model, tok, TEXT, max_length=max_length, stride=stride)
    assert result.num_tokens == n - 1
    assert math.isfinite(result.perplexity) and result.perplexity > 1.0
    assert not model.language_model.training


def test_eval_cli_perplexity_on_a_t5_folder(tmp_path, capsys):
    """`vlmsparse eval --text` on a saved BLIP-2-T5 folder gives the in-memory number."""
    import json

    from factories import synthetic_processor

    from vlmsparse.cli import main

    model, processor = tiny_blip2_t5(), synthetic_processor("blip2")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--max-length", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = perplexity(model, processor.tokenizer, TEXT, max_length=16)
    assert report["num_tokens"] == expected.num_tokens
    assert report["nll"] == pytest.approx(expected.nll, rel=1e-5)


def test_perplexity_of_folder_reads_the_text_first_and_needs_a_tokenizer(tmp_path, monkeypatch):
    """What `vlmsparse eval --text` runs: the in-memory number; a missing or empty text fails before the model
    loads; a folder without a tokenizer is refused."""
    from factories import synthetic_processor

    import vlmsparse.pipeline.save as save
    from vlmsparse.eval.perplexity import perplexity_of_folder

    model, processor = tiny_blip2_t5(), synthetic_processor("blip2")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    result = perplexity_of_folder(tmp_path / "m", tmp_path / "t.txt", max_length=16)
    assert result == perplexity(model, processor.tokenizer, TEXT, max_length=16)

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    with monkeypatch.context() as patch:
        patch.setattr(save, "load_model", no_load)
        (tmp_path / "empty.txt").write_text("  \n")
        with pytest.raises(ValueError, match="the text is empty"):
            perplexity_of_folder(tmp_path / "m", tmp_path / "empty.txt")
        with pytest.raises(FileNotFoundError):
            perplexity_of_folder(tmp_path / "m", tmp_path / "absent.txt")
    tiny_llama().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no tokenizer saved in the folder"):
        perplexity_of_folder(tmp_path / "bare", tmp_path / "t.txt")


@pytest.mark.parametrize("choice", ["onednn", "torch"])
def test_perplexity_forwards_run_on_the_cpu_gemm_choice(choice, monkeypatch):
    """The float32 CPU linears go through cpu_gemm.linear on oneDNN (none on torch), with torch's result within
    float32 rounding; the forwards are restored afterwards."""
    from torch import nn

    from vlmsparse.kernels import cpu_gemm

    if choice == "onednn" and not cpu_gemm.onednn_available():
        pytest.skip("this torch has no working oneDNN linear op")
    model, tok = tiny_llama(), build_tokenizer()
    monkeypatch.setenv(cpu_gemm.ENV, "torch")
    expected = perplexity(model, tok, TEXT, max_length=16)
    monkeypatch.setenv(cpu_gemm.ENV, choice)
    calls = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda *a: calls.append(1) or real(*a))
    got = perplexity(model, tok, TEXT, max_length=16)
    assert (len(calls) > 0) == (choice == "onednn")
    assert got.num_tokens == expected.num_tokens and got.nll == pytest.approx(expected.nll, rel=1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))
