"""Distillation losses: pure functions of logits and labels, returning the total and its unweighted parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import NO_LABEL  # -1: the label of a transfer row; the teacher's soft labels are its only target


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, kind: str = "kl") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + (1 - alpha) * KD, averaged over the B rows of the batch.

    student_logits, teacher_logits: (B, C); labels: (B,) int64, NO_LABEL (-1) for a transfer row.
    Per row i:   loss_i = alpha * [y_i labelled] * CE_i + (1 - alpha) * KD_i
    and the batch loss is the plain mean of loss_i over all B rows. A transfer row has no label, so its hard-label
    term is absent: it contributes (1 - alpha) * KD_i only. With alpha = 1 it contributes nothing (no teacher).
    kind "kl":  KD_i = T^2 * KL(softmax(teacher_i / T) || softmax(student_i / T))   (Hinton et al.; T^2 keeps the
                gradient scale independent of T)
    kind "mse": KD_i = mean over classes of (student_i - teacher_i)^2               (no temperature)
    Returns (total, {"ce": ce, "kd": kd}) with the parts unweighted (KD without the T^2 factor) and averaged over
    all B rows, so that total = alpha * ce + (1 - alpha) * T^2 * kd (kl) or alpha * ce + (1 - alpha) * kd (mse).
    For a batch without transfer rows this is the usual batch-mean cross-entropy and KL.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    B = student_logits.shape[0]
    ce = F.cross_entropy(student_logits, labels, ignore_index=NO_LABEL, reduction="sum") / B
    if kind == "kl":
        t = temperature
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True)
        total = alpha * ce + (1.0 - alpha) * t * t * kd
    else:
        kd = F.mse_loss(student_logits, teacher_logits)
        total = alpha * ce + (1.0 - alpha) * kd
    return total, {"ce": ce.detach(), "kd": kd.detach()}
