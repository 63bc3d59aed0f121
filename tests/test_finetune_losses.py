"""The finetuning loss: CE + KL(teacher || student) on answer tokens only; the config's validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmsparse.training.config import FinetuneConfig
from vlmsparse.training.losses import answer_positions, distillation_loss


def _batch(seed=0, b=2, length=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=g, dtype=torch.float64)
    teacher = torch.randn(b, length, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[:, :4] = -100  # prompt / image tokens
    labels[1, 6] = -100  # padding
    return logits, teacher, labels


def _reference(logits, teacher, labels, lam, t):
    """Loop over every (row, position) predicting an answer token."""
    ce, kl, n = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            target = labels[b, i + 1]
            if target == -100:
                continue
            ce += -torch.log_softmax(logits[b, i], -1)[target]
            p_t = torch.softmax(teacher[b, i] / t, -1)
            kl += (p_t * (p_t.log() - torch.log_softmax(logits[b, i] / t, -1))).sum() * t * t
            n += 1
    return (1 - lam) * ce / n + lam * kl / n, ce / n, kl / n


@pytest.mark.parametrize("lam,t", [(0.1, 1.0), (0.5, 2.0), (1.0, 0.5)])
def test_loss_matches_loop_reference(lam, t):
    logits, teacher, labels = _batch()
    loss, ce, kl = distillation_loss(logits, labels, teacher, lam, t)
    ref_loss, ref_ce, ref_kl = _reference(logits, teacher, labels, lam, t)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-6)


def test_no_teacher_is_hf_shifted_ce():
    logits, _, labels = _batch(1)
    loss, ce, kl = distillation_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.double(), expected)
    assert kl is None


def test_only_answer_positions_count():
    logits, teacher, labels = _batch(2)
    loss, _, _ = distillation_loss(logits, labels, teacher, 0.5)
    # changing logits at positions that predict prompt / padding tokens changes nothing
    edited_s, edited_t = logits.clone(), teacher.clone()
    edited_s[:, :3] += 5 * torch.randn_like(edited_s[:, :3])
    edited_t[:, :3] -= 3.0 * torch.randn_like(edited_t[:, :3])
    edited_t[1, 5:] += 7.0
    assert torch.equal(distillation_loss(edited_s, labels, edited_t, 0.5)[0], loss)
    # a position that predicts an answer token does count
    edited_t[0, 4] += torch.randn(11, dtype=torch.float64)
    assert not torch.equal(distillation_loss(logits, labels, edited_t, 0.5)[0], loss)


def test_kl_is_zero_for_identical_teacher_and_grad_flows():
    logits, _, labels = _batch(3)
    student = logits.clone().requires_grad_(True)
    loss, ce, kl = distillation_loss(student, labels, logits.clone(), 1.0)
    assert abs(float(kl)) < 1e-6
    loss.backward()
    assert student.grad is not None and student.grad.abs().max() < 1e-6  # KL at its minimum (float32 inside)


def test_prepended_positions_and_empty_batches():
    logits, _, labels = _batch(4)
    extra = torch.cat([torch.randn(2, 3, 11, dtype=torch.float64), logits], dim=1)  # e.g. query tokens prepended
    assert torch.equal(distillation_loss(extra, labels)[0], distillation_loss(logits, labels)[0])
    s, t = answer_positions(logits, labels)
    assert s.shape == (int((labels[:, 1:] != -100).sum()), 11) and t.shape == s.shape[:1]
    student = logits.clone().requires_grad_(True)
    loss, _, _ = distillation_loss(student, torch.full_like(labels, -100))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph (DDP needs every rank to run backward)
    with pytest.raises(ValueError, match="lam must be in"):
        distillation_loss(logits, labels, logits, 1.5)


def test_config_validation():
    config = FinetuneConfig()
    assert config.method == "sparselora" and config.rank("language") == 8 and config.rank("vision") == 4
    assert config.lora_alpha == 16 and config.parts == ("language", "vision") and config.teacher_source is None
    assert FinetuneConfig(distill_lambda=0.1).teacher_source == "self"
    assert FinetuneConfig(distill_lambda=0.1, teacher="/dense").teacher_source == "/dense"
    assert "save_steps" not in config.identity() and "learning_rate" in config.identity()
    for kwargs, match in [
        ({"method": "dora"}, "method='dora' is not allowed"),
        ({"parts": ("language", "audio")}, "parts="),
        ({"parts": "language"}, "parts="),
        ({"rank_vision": 0}, "rank_vision=0"),
        ({"distill_lambda": 1.5}, "distill_lambda=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"teacher": "/dense"}, "distill_lambda=0"),
        ({"save_steps": -1}, "save_steps=-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            FinetuneConfig(**kwargs)


def test_progress_bar_shows_the_loss():
    from transformers import TrainerControl, TrainerState

    from vlmsparse.training.trainer import LossBarCallback

    state = TrainerState(max_steps=3, is_world_process_zero=True)
    bar = LossBarCallback()
    bar.on_train_begin(None, state, TrainerControl())
    bar.on_log(None, state, TrainerControl(), logs={"loss": 1.23456, "ce": 1.2, "learning_rate": 1e-4})
    assert bar.training_bar.postfix == "loss=1.2346"
    bar.on_log(None, state, TrainerControl(), logs={"loss": 2.0, "ce": 1.5, "kl": 0.5})
    assert bar.training_bar.postfix == "loss=2.0000, ce=1.5000, kl=0.5000"
    bar.on_train_end(None, state, TrainerControl())


@pytest.mark.parametrize("kind", ["llava", "blip2-t5"])
def test_loss_equals_the_models_own_loss(kind):
    """On real batches the answer-token CE equals the loss transformers computes from ``labels``: for a
    decoder-only LLaVA (labels aligned with input_ids) and for BLIP-2 with a Flan-T5-style encoder-decoder
    (decoder inputs built by the dataset, HF shifting the labels itself)."""
    from factories import synthetic_processor, tiny_blip2_t5, tiny_llava

    from vlmsparse.data.datasets import SyntheticVQADataset, VLMCollator

    processor = synthetic_processor("llava" if kind == "llava" else "blip2")
    if kind == "llava":
        model, start = tiny_llava(seed=3), None
    else:
        model, start = tiny_blip2_t5(seed=3), 0
    model.config.image_token_index = 4  # "<image>" of the synthetic processor
    ds = SyntheticVQADataset(processor, num=3, seed=5, decoder_start_token_id=start)
    batch = VLMCollator(pad_token_id=processor.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours, _, _ = distillation_loss(model(**inputs).logits, batch["labels"])
        if kind == "llava":
            theirs = model(**inputs, labels=batch["labels"]).loss
        else:  # HF builds the decoder inputs from the labels: drop ours and the masked start column
            plain = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
            theirs = model(**plain, labels=batch["labels"][:, 1:].contiguous()).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert ours.item() > 0.5  # an untrained model: a real CE, not an empty selection
