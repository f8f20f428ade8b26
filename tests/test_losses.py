"""The distillation loss against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainable.losses import distillation_loss


def test_identical_logits_give_zero_kd():
    s = torch.tensor([[1.0, -2.0], [0.3, 0.7]])
    total, parts = distillation_loss(s, s.clone(), torch.tensor([0, 1]), alpha=0.0, temperature=3.0)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert total.item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_one_is_plain_cross_entropy():
    s, t, y = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 2, (8,))
    total, parts = distillation_loss(s, t, y, alpha=1.0, temperature=4.0)
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(total.item(), rel=1e-6)


def test_hand_computed_kl_with_t_squared():
    s, t, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    T, alpha = 2.0, 0.25
    p = [math.exp(1.0) / (math.exp(1.0) + 1), 1 / (math.exp(1.0) + 1)]  # softmax(teacher / 2)
    q = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]  # softmax(student / 2)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(math.exp(1.0) / (1 + math.exp(1.0)))
    total, parts = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    assert parts["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, rel=1e-5)


def test_t_squared_scaling():
    s, t, y = torch.randn(16, 2), torch.randn(16, 2), torch.randint(0, 2, (16,))
    for T in (1.0, 3.0, 10.0):
        total, parts = distillation_loss(s, t, y, alpha=0.0, temperature=T)
        assert total.item() == pytest.approx(T * T * parts["kd"].item(), rel=1e-5)


def test_mse_kind_and_bad_kind():
    s, t, y = torch.randn(4, 2), torch.randn(4, 2), torch.randint(0, 2, (4,))
    total, parts = distillation_loss(s, t, y, alpha=0.5, temperature=7.0, kind="mse")
    assert parts["kd"].item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.5 * F.cross_entropy(s, y).item() + 0.5 * parts["kd"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(s, t, y, 0.5, 2.0, kind="cosine")
