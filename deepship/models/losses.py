"""Distillation losses (torch only): Hinton et al. 2015 for classifiers, token-level KD for decoders,
output matching for regressors. Used by the zoo's recipes (the GPT draft) and by
:mod:`deepship.pipeline.distill`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import StageError

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.1
IGNORE_INDEX = -100


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                ignore_index: int | None = None) -> torch.Tensor:
    """Knowledge-distillation loss of Hinton et al. 2015 (mean over samples, or tokens).

    ``alpha * CE(s, y) + (1 - alpha) * tau^2 * KL(softmax(t / tau) || softmax(s / tau))``

    Args:
        student_logits: float ``(..., C)`` logits of the student (any leading dims: batch, or batch x seq).
        teacher_logits: float ``(..., C)`` logits of the teacher, same shape.
        targets: int64 ``(...)`` class indices (the leading dims of the logits).
        temperature: ``tau`` > 0; softens both distributions.
        alpha: weight of the hard-label cross-entropy in [0, 1]; ``1`` = no teacher.
        ignore_index: target value whose positions are left out of both terms (padding tokens).

    Returns:
        A scalar float tensor.

    Raises:
        StageError: shapes that do not match, or ``temperature``/``alpha`` out of range.
    """
    if student_logits.shape != teacher_logits.shape:
        raise StageError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; student and teacher must share the output")
    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise StageError(f"temperature {temperature} must be > 0 and alpha {alpha} in [0, 1]")
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c).float()
    t = teacher_logits.reshape(-1, c).float()
    y = targets.reshape(-1).long()
    keep = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
    n = keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    loss = alpha * (ce * keep).sum() / n
    if alpha < 1.0:
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="none", log_target=True).sum(-1)
        loss = loss + (1.0 - alpha) * temperature ** 2 * (kl * keep).sum() / n
    return loss


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Token-level KD for decoders: :func:`hinton_loss` over ``(batch, seq, vocab)`` logits and
    int64 ``(batch, seq)`` next-token targets, positions with target ``-100`` masked. Scalar."""
    return hinton_loss(student_logits, teacher_logits, targets, temperature, alpha, ignore_index=IGNORE_INDEX)


def regression_kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, targets: torch.Tensor,
                       alpha: float = DEFAULT_ALPHA, scale: float = 1.0) -> torch.Tensor:
    """``alpha * MSE(s, y) + (1 - alpha) * MSE(s, t)`` on values divided by ``scale`` (the model's std).

    Args:
        student_out, teacher_out, targets: float tensors of one shape, e.g. ``(batch, 1)``.
        scale: divides all three, so the loss does not depend on the data's units.

    Returns:
        A scalar float tensor.
    """
    s, t, y = student_out / scale, teacher_out / scale, targets.reshape(student_out.shape) / scale
    loss = alpha * F.mse_loss(s, y)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.mse_loss(s, t)
    return loss
