"""Distillation losses: pure functions of logits and labels, returning the total and its unweighted parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, kind: str = "kl") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE(student, labels) + (1 - alpha) * KD, batch means.

    student_logits, teacher_logits: (B, C); labels: (B,) int64.
    kind "kl":  KD = T^2 * KL(softmax(teacher / T) || softmax(student / T))   (Hinton et al.; T^2 keeps the
                gradient scale independent of T)
    kind "mse": KD = MSE(student_logits, teacher_logits)                      (no temperature)
    Returns (total, {"ce": ce, "kd": kd}) with the parts unweighted (KD without the T^2 factor) for logging.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    ce = F.cross_entropy(student_logits, labels)
    if kind == "kl":
        t = temperature
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True)
        total = alpha * ce + (1.0 - alpha) * t * t * kd
    else:
        kd = F.mse_loss(student_logits, teacher_logits)
        total = alpha * ce + (1.0 - alpha) * kd
    return total, {"ce": ce.detach(), "kd": kd.detach()}
