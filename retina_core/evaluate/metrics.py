"""Classification metrics as one JSON-ready dict (capability 11).

Every number that scikit-learn defines is computed by scikit-learn. All values are fractions in [0, 1]
(not percent) except kappa (in [-1, 1]), counts and ``n``. Undefined values are ``None`` (JSON null), never NaN.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from retina_core.errors import RetinaInputError
from retina_core.evaluate.calibration import as_class_probs, expected_calibration_error


def _num(x) -> float | None:
    """numpy scalar -> Python float; NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values) -> float | None:
    """Mean of the defined (non-None) values, None when there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _check(y_true, probs, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (y (N,) int64, p (N, C) float64)."""
    y = np.asarray(y_true).reshape(-1)
    p = as_class_probs(probs)
    if len(y) == 0:
        raise RetinaInputError("No samples to evaluate: the label list is empty.")
    if len(y) != len(p):
        raise RetinaInputError(f"{len(y)} labels but {len(p)} predictions: they must match one to one.")
    if p.shape[1] != len(class_names):
        raise RetinaInputError(f"Predictions have {p.shape[1]} classes but {len(class_names)} class names were given.")
    if not np.all(np.isfinite(p)):
        raise RetinaInputError("Predictions contain NaN or infinite probabilities.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise RetinaInputError("Labels must be integer class indices.")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= len(class_names):
        raise RetinaInputError(f"Labels must lie in 0..{len(class_names) - 1} (one per class name).")
    return y.astype(np.int64), p


def per_class_auc(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class (sklearn roc_auc_score); None when a class is absent from y or is all of y."""
    out = []
    for c in range(p.shape[1]):
        pos = y == c
        out.append(_num(roc_auc_score(pos, p[:, c])) if 0 < pos.sum() < len(y) else None)
    return out


def sensitivity_specificity(cm: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """Per-class sensitivity TP/(TP+FN) and specificity TN/(TN+FP) from a confusion matrix (rows = true)."""
    total = cm.sum()
    sens, spec = [], []
    for c in range(cm.shape[0]):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = total - tp - fn - fp
        sens.append(_num(tp / (tp + fn)) if tp + fn else None)
        spec.append(_num(tn / (tn + fp)) if tn + fp else None)
    return sens, spec


def classification_metrics(y_true, probs, class_names, ordinal: bool = False, n_bins: int = 15) -> dict:
    """Metrics of predicted probabilities against true labels, JSON-ready.

    y_true: (N,) int class indices. probs: (N, C) class probabilities (rows sum to 1), or (N,) / (N, 1)
    P(positive) for a binary model with one logit (apply the sigmoid first); then class_names has 2 entries.
    ordinal: classes are ordered grades (e.g. ICDR DR 0-4) -> adds quadratic weighted kappa.
    Prediction = argmax of probs.

    Returns keys: n, class_names, accuracy, auc_macro (one-vs-rest, mean over classes present in y_true;
    for binary it equals the plain ROC AUC), auc_classes (names it was averaged over), sensitivity_macro,
    specificity_macro, f1_macro (sklearn macro F1: classes in y_true or predictions), kappa_quadratic
    (ordinal only, else None), ece, reliability_bins (n_bins dicts: lower, upper, confidence, accuracy, count),
    confusion_matrix (list of lists, rows = true class, columns = predicted), per_class
    ({name: {support, sensitivity, specificity, f1, auc}}), notes (list of strings on what was left out and why).
    """
    names = [str(c) for c in class_names]
    y, p = _check(y_true, probs, names)
    n_cls = len(names)
    labels = list(range(n_cls))
    pred = p.argmax(axis=1)
    notes: list[str] = []

    cm = confusion_matrix(y, pred, labels=labels)
    sens, spec = sensitivity_specificity(cm)
    f1s = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    seen = set(y.tolist()) | set(pred.tolist())
    aucs = per_class_auc(y, p)
    absent = [names[c] for c in labels if c not in set(y.tolist())]
    if absent:
        notes.append(f"Classes absent from the true labels: {', '.join(absent)}; their sensitivity and AUC are "
                     "undefined and left out of the macro averages.")
    auc_classes = [names[c] for c in labels if aucs[c] is not None]
    if n_cls == 2:  # binary: the OvR AUCs of both classes coincide; report one
        auc_macro = aucs[1]
    else:
        auc_macro = _mean(aucs)
    if auc_macro is None:
        notes.append("AUC undefined: the true labels contain a single class.")
    ece, bins = expected_calibration_error(p, y, n_bins)
    kappa = None
    if ordinal:
        kappa = _num(cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))

    per_class = {
        names[c]: {
            "support": int(cm[c].sum()),
            "sensitivity": sens[c],
            "specificity": spec[c],
            "f1": _num(f1s[c]) if c in seen else None,
            "auc": aucs[c],
        }
        for c in labels
    }
    return {
        "n": int(len(y)),
        "class_names": names,
        "accuracy": _num(accuracy_score(y, pred)),
        "auc_macro": auc_macro,
        "auc_classes": auc_classes,
        "sensitivity_macro": _mean(sens),
        "specificity_macro": _mean(spec),
        "f1_macro": _num(f1_score(y, pred, average="macro", zero_division=0)),
        "kappa_quadratic": kappa,
        "ece": _num(ece),
        "reliability_bins": bins,
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
        "notes": notes,
    }


BOOTSTRAP_KEYS = ("accuracy", "auc_macro", "sensitivity_macro", "specificity_macro", "f1_macro")


def _rank_auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic on average ranks (ties count one half): sklearn's roc_auc_score,
    without its per-call validation, which dominated the bootstrap's 1,000 resamples."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)
    return _num((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _point(y: np.ndarray, p: np.ndarray, n_cls: int) -> dict[str, float | None]:
    """The headline metrics of one bootstrap resample (the same values as `classification_metrics`' ones)."""
    pred = p.argmax(axis=1)
    cm = np.bincount(y * n_cls + pred, minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    sens, spec = sensitivity_specificity(cm)
    aucs = [_rank_auc(y == c, p[:, c]) for c in range(n_cls)]
    tp = np.diag(cm).astype(float)
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_cls), where=denom > 0)    # zero_division=0, as sklearn's
    return {"accuracy": float((pred == y).mean()), "auc_macro": aucs[1] if n_cls == 2 else _mean(aucs),
            "sensitivity_macro": _mean(sens), "specificity_macro": _mean(spec), "f1_macro": _num(f1.mean())}


def bootstrap_ci(y_true, probs, class_names, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 groups=None) -> dict:
    """Percentile bootstrap intervals of the headline metrics: ``{metric: [low, high]}`` plus ``n_boot`` and
    ``level``. With ``groups`` (e.g. patient ids, one per sample) whole groups are resampled, so several images of
    one eye do not narrow the interval. Resamples where a metric is undefined (one class only) are left out of
    that metric's interval."""
    names = [str(c) for c in class_names]
    y, p = _check(y_true, probs, names)
    rng = np.random.default_rng(seed)
    members = group_members(groups, len(y))
    draws: dict[str, list[float]] = {k: [] for k in BOOTSTRAP_KEYS}
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in pick])
        for k, v in _point(y[idx], p[idx], len(names)).items():
            if v is not None:
                draws[k].append(v)
    out = {k: percentile_interval(v, level) for k, v in draws.items()}
    return {**out, "n_boot": int(n_boot), "level": level, "resampled": "patients" if groups is not None else "images"}


def group_members(groups, n: int) -> list[np.ndarray]:
    """The sample indices of each group (e.g. patient ids, one per sample), the units a bootstrap resamples; one
    group per sample when `groups` is None."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    g = np.asarray(groups).reshape(-1)
    if len(g) != n:
        raise RetinaInputError(f"{len(g)} groups for {n} samples: they must match one to one.")
    _, inv = np.unique(g.astype(str), return_inverse=True)
    return [np.flatnonzero(inv == k) for k in range(inv.max() + 1)]


def percentile_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """The percentile bootstrap interval [low, high] of resampled values, or None from fewer than 20 of them."""
    if len(values) < 20:
        return None
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return [round(float(np.percentile(values, lo)), 4), round(float(np.percentile(values, hi)), 4)]
