"""Selective prediction: how often a model is right when it is confident, and where "confident" starts.

A calibrated model's top-class probability says how sure it is; a clinician needs to know what that is worth on
held-out images. `fit_threshold` picks, on a validation split, the lowest top-class probability at which the
readings at or above it reach a target accuracy (e.g. 0.90); `band_accuracy` then measures, on another split, how
many readings are that confident (coverage) and how often they, and the readings below, are right, with
patient-level bootstrap intervals. `python -m retina_core confidence` does both and records the result in the
weights' manifest (`confidence`), which every reading then quotes (`models.loading.confidence_note`).

    >>> t = fit_threshold(y_val, p_val, target=0.90)          # chosen on validation only
    >>> band_accuracy(y_test, p_test, t, groups=patients)     # {"coverage": 0.65, "accuracy_confident": 0.89, ...}
"""
from __future__ import annotations

import numpy as np

from ..errors import RetinaInputError
from .metrics import group_members, percentile_interval

__all__ = ["top_confidence", "fit_threshold", "band_accuracy", "risk_coverage"]


def top_confidence(probs) -> tuple[np.ndarray, np.ndarray]:
    """(top-class probability [N], predicted class [N]) of (N, C) probabilities, or of (N,) P(positive)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
        p = p.reshape(-1)
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or not len(p):
        raise RetinaInputError(f"probabilities of shape {np.shape(probs)}: expected (N, C) or (N,), N > 0.")
    return p.max(axis=1), p.argmax(axis=1)


def fit_threshold(y_true, probs, target: float = 0.90, min_confident: int = 30) -> float | None:
    """The lowest top-class probability t such that the readings with confidence >= t are right at least `target`
    of the time, counting at least `min_confident` of them; None when no t reaches it. The lowest such t keeps
    the most readings confident. Fit it on a validation split, never on the split it is then scored on."""
    conf, pred = top_confidence(probs)
    right = pred == np.asarray(y_true).reshape(-1)
    order = np.argsort(-conf, kind="stable")
    cum_right = np.cumsum(right[order])
    counts = np.arange(1, len(order) + 1)
    ok = (cum_right / counts >= target) & (counts >= min_confident)
    # only cut between distinct confidences: everything tied with the last one kept is kept too
    last_of_tie = np.r_[conf[order][1:] != conf[order][:-1], True]
    ok &= last_of_tie
    if not ok.any():
        return None
    k = int(np.flatnonzero(ok).max())
    return float(conf[order][k])


def _accuracy(right: np.ndarray) -> float | None:
    return round(float(right.mean()), 4) if len(right) else None


def band_accuracy(y_true, probs, threshold: float, groups=None, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """Readings at or above `threshold` (confident) and below it (unsure): how many, and how often right, each
    with a percentile bootstrap interval (over `groups`, e.g. patient ids, when given; else over images).
    JSON-ready: threshold, n, confident, coverage, accuracy_confident, ci95_confident, unsure, accuracy_unsure,
    ci95_unsure, resampled."""
    conf, pred = top_confidence(probs)
    y = np.asarray(y_true).reshape(-1)
    if len(y) != len(conf):
        raise RetinaInputError(f"{len(y)} labels for {len(conf)} probability rows: they must match one to one.")
    right = pred == y
    sure = conf >= threshold
    members = group_members(groups, len(y))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"confident": [], "unsure": []}
    for _ in range(int(n_boot)):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        for key, keep in (("confident", sure[idx]), ("unsure", ~sure[idx])):
            if keep.any():
                draws[key].append(float(right[idx][keep].mean()))
    return {"threshold": round(float(threshold), 4), "n": int(len(y)), "confident": int(sure.sum()),
            "coverage": round(float(sure.mean()), 4), "accuracy_confident": _accuracy(right[sure]),
            "ci95_confident": percentile_interval(draws["confident"], level), "unsure": int((~sure).sum()),
            "accuracy_unsure": _accuracy(right[~sure]),
            "ci95_unsure": percentile_interval(draws["unsure"], level),
            "resampled": "patients" if groups is not None else "images"}


def risk_coverage(y_true, probs) -> dict:
    """The accuracy of the k most confident readings for every k: {"coverage": [...], "accuracy": [...],
    "confidence": [...]} (each of length N, most confident first), for a risk-coverage plot."""
    conf, pred = top_confidence(probs)
    right = pred == np.asarray(y_true).reshape(-1)
    order = np.argsort(-conf, kind="stable")
    counts = np.arange(1, len(order) + 1)
    return {"coverage": (counts / len(order)).tolist(), "accuracy": (np.cumsum(right[order]) / counts).tolist(),
            "confidence": conf[order].tolist()}
