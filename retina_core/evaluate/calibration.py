"""Probability calibration: temperature scaling, expected calibration error (ECE), reliability bins.

Conventions
- ``logits``: raw network outputs, shape (N, C) for C classes, or (N,) / (N, 1) for a single binary logit.
  A single logit z is treated as the two-class logit pair (0, z), so softmax((0, z) / T) == sigmoid(z / T).
- ``probs``: probabilities, shape (N, C) with rows summing to 1, or (N,) = P(positive class) for binary.
- ``labels``: integer class indices, shape (N,), in [0, C).
- Temperatures are dimensionless; probabilities and ECE are fractions in [0, 1] (not percent).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, softmax

T_MIN, T_MAX = 0.05, 20.0


def _to_numpy(x) -> np.ndarray:
    """Tensor or array-like -> float64 numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _two_column_logits(logits) -> np.ndarray:
    """(N, C) logits unchanged; (N,) or (N, 1) single logits -> (N, 2) pairs (0, z)."""
    z = _to_numpy(logits)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C) or (N,), got {z.shape}")
    return z


def as_class_probs(probs) -> np.ndarray:
    """Probabilities as an (N, C) array; (N,) or (N, 1) P(positive) -> (N, 2) columns (1 - p, p)."""
    p = _to_numpy(probs)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C) or (N,), got {p.shape}")
    return p


def _nll_and_grad(log_t: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(z / T) and its derivative with respect to log T.

    d NLL / d log T = mean((z_y - E_softmax[z]) / T).
    """
    t = math.exp(float(log_t[0]))
    scaled = z / t
    logp = log_softmax(scaled, axis=1)
    nll = -float(np.mean(logp[np.arange(len(y)), y]))
    expected = np.sum(np.exp(logp) * z, axis=1)
    grad = float(np.mean((z[np.arange(len(y)), y] - expected) / t))
    return nll, np.array([grad])


def fit_temperature(logits, labels, bounds: tuple[float, float] = (T_MIN, T_MAX)) -> float:
    """Temperature T > 0 minimising the mean negative log-likelihood of softmax(logits / T).

    logits: (N, C) or (N,) single binary logits (numpy or torch); labels: (N,) ints in [0, C) ({0, 1} for
    single logits). Optimises log T with L-BFGS-B, bounded to log(bounds) = [log 0.05, log 20] by default.
    T > 1 softens over-confident models, T < 1 sharpens under-confident ones. Returns T as a float.
    """
    z = _two_column_logits(logits)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if len(y) != len(z) or len(y) == 0:
        raise ValueError(f"need as many labels as logits rows (got {len(y)} labels, {len(z)} rows)")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    if bool((z[rows, y] > others.max(axis=1)).all()):
        # every row already right (its class strictly on top): the NLL falls monotonically as T -> 0, so the fit has no optimum and would run to
        # the lower bound, turning every later prediction into a certainty. There is no evidence to rescale: T = 1.
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    res = minimize(_nll_and_grad, x0=np.array([0.0]), args=(z, y), jac=True,
                   method="L-BFGS-B", bounds=[(lo, hi)], options={"ftol": 1e-12, "gtol": 1e-9})
    return float(math.exp(float(res.x[0])))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T): (N, C) -> (N, C); single logits (N,) -> sigmoid, (N,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _to_numpy(logits)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        return expit(z / temperature)
    return softmax(z / temperature, axis=1)


def reliability_bins(probs, labels, n_bins: int = 15) -> list[dict]:
    """Reliability-diagram bins of top-class confidence.

    probs: (N, C) or (N,) binary P(positive); labels: (N,) ints. Confidence = max class probability,
    correct = (argmax == label). Bin b covers (b / n_bins, (b + 1) / n_bins] (bin 0 also takes 0).
    Returns n_bins dicts {lower, upper, confidence (mean), accuracy (fraction correct), count};
    confidence and accuracy are None for empty bins.
    """
    p = as_class_probs(probs)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"need as many labels as probability rows (got {len(y)}, {len(p)})")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append({
            "lower": b / n_bins,
            "upper": (b + 1) / n_bins,
            "confidence": float(conf[mask].mean()) if count else None,
            "accuracy": float(correct[mask].mean()) if count else None,
            "count": count,
        })
    return bins


def expected_calibration_error(probs, labels, n_bins: int = 15) -> tuple[float, list[dict]]:
    """ECE = sum_b (count_b / N) * |accuracy_b - confidence_b| over equal-width confidence bins.

    Shapes as in ``reliability_bins``. Returns (ece as a fraction in [0, 1], the bins).
    """
    bins = reliability_bins(probs, labels, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return 0.0, bins
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    return float(ece), bins
