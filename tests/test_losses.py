import math

import pytest
import torch
import torch.nn.functional as F

from retina_core.train.losses import FocalLoss


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_computed_dynamic_alpha_with_smoothing():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    s, gamma = 0.1, 2.0
    alpha = 3 / 4  # fraction of negatives in the batch
    expected = []
    for z, label in zip([2.0, -1.0, 0.5, -3.0], [1, 0, 0, 0]):
        t = label * (1 - s) + 0.5 * s
        p = _sig(z)
        log_pt = t * math.log(p) + (1 - t) * math.log(1 - p)
        pt = math.exp(log_pt)
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        expected.append(-alpha_t * (1 - pt) ** gamma * log_pt)
    loss = FocalLoss(gamma=gamma, label_smoothing=s, reduction="none")(logits, y)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    # first element written fully by hand: t = 0.95, alpha_t = 0.75*0.95 + 0.25*0.05 = 0.725
    p = 1 / (1 + math.exp(-2.0))
    log_pt = 0.95 * math.log(p) + 0.05 * math.log(1 - p)
    assert loss[0].item() == pytest.approx(-0.725 * (1 - math.exp(log_pt)) ** 2 * log_pt, rel=1e-5)
    mean = FocalLoss(gamma=gamma, label_smoothing=s)(logits, y)
    assert mean.item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_gamma0_alpha_half_is_half_bce():
    logits = torch.tensor([[0.3], [-2.0], [4.0]])
    y = torch.tensor([1, 0, 0])
    fl = FocalLoss(alpha=0.5, gamma=0.0, dynamic_alpha=False)(logits, y)
    bce = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.float())
    assert fl.item() == pytest.approx(0.5 * bce.item(), rel=1e-6)


def test_no_alpha_gamma0_is_bce_and_stable_for_large_logits():
    logits = torch.tensor([100.0, -100.0, 30.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0])
    loss = FocalLoss(gamma=0.0, dynamic_alpha=False, reduction="sum")(logits, y)
    assert loss.item() == pytest.approx(200.0, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_reductions_and_dynamic_alpha_clip():
    logits, y = torch.randn(8, 1), torch.zeros(8, 1)
    assert FocalLoss(reduction="none")(logits, y).shape == (8, 1)
    assert FocalLoss(reduction="mean")(logits, y).shape == ()
    assert FocalLoss(reduction="sum")(logits, y).shape == ()
    none = FocalLoss(reduction="none")(logits, y)
    assert FocalLoss(reduction="sum")(logits, y).item() == pytest.approx(none.sum().item(), rel=1e-6)
    assert float(FocalLoss().batch_alpha(y)) == pytest.approx(0.95)  # all negative -> clamped
    assert float(FocalLoss().batch_alpha(torch.tensor([1.0, 0, 0, 0, 0]))) == pytest.approx(0.8)


def test_focusing_downweights_easy_examples():
    logits, y = torch.tensor([4.0, 0.1]), torch.tensor([1.0, 1.0])
    fl = FocalLoss(gamma=2.0, dynamic_alpha=False, reduction="none")(logits, y)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert (fl / bce)[0] < (fl / bce)[1] < 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        FocalLoss(alpha=0.25)  # fixed alpha needs dynamic_alpha=False
    with pytest.raises(ValueError):
        FocalLoss(reduction="avg")
    with pytest.raises(ValueError):
        FocalLoss()(torch.zeros(3), torch.zeros(4))
