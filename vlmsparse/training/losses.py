"""Losses for finetuning: next-token CE on answer tokens, and distillation from a dense teacher.

With ``z_s``, ``z_t`` the student / teacher logits at the positions that predict an answer token, ``T`` the
temperature and ``lambda`` the distillation weight::

    CE   = mean over answer tokens of -log softmax(z_s)[label]
    KL   = T^2 * mean over answer tokens of sum_v p_t(v) (log p_t(v) - log p_s(v)),  p = softmax(z / T)
    loss = (1 - lambda) * CE + lambda * KL

Answer tokens are the positions whose label is not -100 (the prompt, image tokens and padding are -100).
Position ``i`` of the logits predicts token ``i + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["answer_positions", "distillation_loss"]

IGNORE_INDEX = -100


def answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift for next-token prediction: ``(logits [N, V], targets [N])`` at the N answer positions.

    ``logits`` ``[B, L', V]``, ``labels`` ``[B, L]``; when the model prepends tokens (``L' > L``, e.g. query
    tokens not present in ``input_ids``) the last ``L`` logits are the ones aligned with the labels.
    """
    if logits.shape[1] < labels.shape[1]:
        raise ValueError(f"logits cover {logits.shape[1]} positions but labels {labels.shape[1]}")
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    shifted_logits = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return shifted_logits[keep], targets[keep]


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    lam: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, ce, kl)`` as in the module docstring; ``kl`` is None without a teacher (then loss = CE).

    Computed in float32 whatever the logits' dtype. A batch without answer tokens gives a zero loss that
    still depends on the logits (so every process of a distributed run takes part in the backward).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, targets = answer_positions(student_logits, labels)
    student = student.float()
    if targets.numel() == 0:
        zero = student_logits.sum() * 0.0
        return zero, zero.detach(), None if teacher_logits is None else zero.detach()
    ce = F.cross_entropy(student, targets)
    if teacher_logits is None or lam == 0.0:
        return ce, ce.detach(), None
    teacher, _ = answer_positions(teacher_logits, labels)
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean() * temperature**2
    loss = (1.0 - lam) * ce + lam * kl
    return loss, ce.detach(), kl.detach()
