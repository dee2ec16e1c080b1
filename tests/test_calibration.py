import numpy as np
import pytest
import torch

from retina_core.evaluate.calibration import (apply_temperature, expected_calibration_error, fit_temperature,
                                              reliability_bins)


def _calibrated(n=4000, c=4, seed=0):
    """Logits z whose softmax is exactly calibrated: labels are sampled from softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, c))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z, y


def test_overconfident_logits_give_t_near_3_and_lower_ece():
    z, y = _calibrated()
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.15)
    ece_before, _ = expected_calibration_error(apply_temperature(3.0 * z, 1.0), y)
    ece_after, _ = expected_calibration_error(apply_temperature(3.0 * z, t), y)
    assert ece_after < 0.5 * ece_before


def test_torch_input_and_single_logit():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=2.0, size=3000)
    y = (rng.uniform(size=3000) < 1 / (1 + np.exp(-z))).astype(int)
    t = fit_temperature(torch.tensor(0.5 * z, dtype=torch.float32), torch.tensor(y))
    assert t == pytest.approx(0.5, rel=0.15)
    p = apply_temperature(z, 2.0)
    assert p.shape == (3000,) and np.allclose(p, 1 / (1 + np.exp(-z / 2.0)))


def test_temperature_is_bounded():
    z = np.array([[5.0, -5.0], [5.0, -5.0]])
    assert fit_temperature(z, np.array([1, 1])) == pytest.approx(20.0)
    # always right: the NLL keeps falling as T -> 0 (no optimum); rather than run to the bound, the fit leaves T = 1
    assert fit_temperature(z, np.array([0, 0])) == 1.0
    small = np.array([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1], [0.1, 0.0, 0.25]])
    assert fit_temperature(small, np.array([0, 1, 2])) == 1.0
    # one row wrong: an interior optimum exists again, and an under-confident model is sharpened (T < 1)
    y = np.array([0, 1, 2, 0])
    assert 0.05 < fit_temperature(np.vstack([small, [0.0, 0.3, 0.1]]) * 10, y) != 1.0


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    ece, bins = expected_calibration_error(probs, labels, n_bins=10)
    # bins: 0.55 -> (0.5,0.6] correct; 0.7 -> (0.6,0.7] correct; 0.8 wrong; 0.9 correct
    expected = (abs(1 - 0.55) + abs(1 - 0.7) + abs(0 - 0.8) + abs(1 - 0.9)) / 4
    assert ece == pytest.approx(expected)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert bins[0]["confidence"] is None and bins[7]["accuracy"] == 0.0
    assert reliability_bins(probs, labels, n_bins=10) == bins
