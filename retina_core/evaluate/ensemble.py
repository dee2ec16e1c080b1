"""Ensembles (capability 8): soft / weighted voting, exhaustive subset ablation, stability over N trainings.

Member outputs are class probabilities, each (N, C) (or (N,) P(positive) for binary one-logit models),
rows aligned to the same N samples. Weights are relative (normalised to sum 1).

The app's Ensemble page reads one image with several models: `ensemble_groups` (which models can vote together),
`ensemble_image` (their soft vote and disagreement) and the saved ablations (`find_ablation_files`, `ablation_rows`).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retina_core.evaluate.metrics import classification_metrics

if TYPE_CHECKING:
    from retina_core.analysis import Analysis

# Metrics where smaller is better; every other ranked metric is "larger is better".
LOWER_IS_BETTER = frozenset({"ece"})
MAX_ABLATION_MEMBERS = 16  # 2^16 - 1 = 65535 subsets


def _normalised(weights, k: int) -> np.ndarray:
    """Weights (k,) >= 0 with a positive sum -> weights / sum; None -> uniform."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != k:
        raise ValueError(f"{len(w)} weights for {k} members")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def soft_vote(probs_list, weights=None) -> np.ndarray:
    """Weighted average of member probabilities.

    probs_list: sequence of k arrays of identical shape (N, C) or (N,); weights: k non-negative numbers
    (normalised to sum 1) or None for equal weights. Returns an array of the same shape (rows still sum to 1).
    """
    arrays = [np.asarray(p, dtype=np.float64) for p in probs_list]
    if not arrays:
        raise ValueError("soft_vote needs at least one member")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"member probabilities differ in shape: {[a.shape for a in arrays]}")
    w = _normalised(weights, len(arrays))
    return np.tensordot(w, np.stack(arrays), axes=1)


def _weights_for(names, weights) -> list[float] | None:
    """Weights of the named members from a {name: weight} dict (None -> equal)."""
    if weights is None:
        return None
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"no weight for members {missing}")
    return [float(weights[n]) for n in names]


def _score(metrics: dict, metric: str) -> float | None:
    value = metrics.get(metric)
    if value is not None and not isinstance(value, (int, float)):
        raise ValueError(f"metric {metric!r} is not a number in classification_metrics output")
    return value


def _rank_key(metric: str):
    """Sort key: best score first, undefined scores last, then fewer members, then names."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0

    def key(entry):
        s = entry["score"]
        return (s is None, sign * s if s is not None else 0.0, len(entry["members"]), entry["members"])

    return key


def ablation(member_probs: dict, y_true, class_names, metric: str = "accuracy", weights: dict | None = None,
             ordinal: bool = False) -> list[dict]:
    """Soft-vote every non-empty subset of members (2^k - 1 of them) and rank them, best first.

    member_probs: {name: probs (N, C) or (N,)}; y_true: (N,) ints; weights: {name: weight} or None (equal);
    within a subset the members' weights are renormalised. metric: a numeric top-level key of
    ``classification_metrics`` (accuracy, auc_macro, f1_macro, sensitivity_macro, specificity_macro,
    kappa_quadratic, ece); ece ranks ascending, the rest descending. Ties: fewer members first.
    Returns [{members: [names], score, metrics}] with ``rank`` 1..2^k - 1.
    """
    names = list(member_probs)
    if not names:
        raise ValueError("ablation needs at least one member")
    if len(names) > MAX_ABLATION_MEMBERS:
        raise ValueError(f"{len(names)} members give {2 ** len(names) - 1} subsets; at most "
                         f"{MAX_ABLATION_MEMBERS} members are supported")
    entries = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            probs = soft_vote([member_probs[n] for n in subset], _weights_for(subset, weights))
            m = classification_metrics(y_true, probs, class_names, ordinal=ordinal)
            entries.append({"members": list(subset), "score": _score(m, metric), "metrics": m})
    entries.sort(key=_rank_key(metric))
    for i, e in enumerate(entries, 1):
        e["rank"] = i
    return entries


def ensemble_report(member_probs: dict, y_true, class_names, weights: dict | None = None,
                    metric: str = "accuracy", ordinal: bool = False) -> dict:
    """Whether the soft-voted ensemble of all members beats its best single member on ``metric``.

    Shapes as in ``ablation``. Returns {metric, members: {name: metrics}, ensemble: metrics, weights
    (normalised, by name), best_member, best_member_score, ensemble_score, improvement (ensemble minus best member,
    sign flipped for lower-is-better metrics so positive always means the ensemble is better; in metric units),
    beats_best_member (improvement > 0)}.
    """
    names = list(member_probs)
    w = _normalised(_weights_for(names, weights), len(names))
    members = {n: classification_metrics(y_true, member_probs[n], class_names, ordinal=ordinal) for n in names}
    ens = classification_metrics(y_true, soft_vote([member_probs[n] for n in names], w), class_names,
                                 ordinal=ordinal)
    ranked = sorted(({"members": [n], "score": _score(members[n], metric)} for n in names), key=_rank_key(metric))
    best = ranked[0]
    ens_score = _score(ens, metric)
    improvement = None
    if best["score"] is not None and ens_score is not None:
        improvement = ens_score - best["score"]
        if metric in LOWER_IS_BETTER:
            improvement = -improvement
    return {
        "metric": metric,
        "members": members,
        "ensemble": ens,
        "weights": {n: float(x) for n, x in zip(names, w)},
        "best_member": best["members"][0],
        "best_member_score": best["score"],
        "ensemble_score": ens_score,
        "improvement": improvement,
        "beats_best_member": bool(improvement is not None and improvement > 0),
    }


def _numeric_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to {dotted.key: number}; lists, strings, bools and None are skipped."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, key + "."))
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)):
            if math.isfinite(float(v)):
                out[key] = float(v)
    return out


def stability_summary(metric_dicts: list[dict]) -> dict:
    """Mean and spread of every numeric metric over N independent trainings (or seeds / folds).

    metric_dicts: list of dicts such as ``classification_metrics`` outputs; nested dicts are flattened to dotted
    keys (e.g. ``per_class.CNV.f1``), lists are ignored. Returns {key: {mean, sd, min, max, n}} where sd is the
    sample standard deviation (ddof = 1; None when n < 2) and n counts the runs in which the metric was defined.
    """
    values: dict[str, list[float]] = {}
    for d in metric_dicts:
        for k, v in _numeric_leaves(d).items():
            values.setdefault(k, []).append(v)
    return {
        k: {
            "mean": float(np.mean(v)),
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": float(np.min(v)),
            "max": float(np.max(v)),
            "n": len(v),
        }
        for k, v in values.items()
    }


# ------------------------------------------------------------------- one image (the app's Ensemble page)
def ensemble_groups(names: list[str]) -> dict[str, list[str]]:
    """Models that can be soft-voted together: same modality and the same class list. {group label: names}."""
    from ..models import get_cfg

    groups: dict[tuple, list[str]] = {}
    for n in names:
        cfg = get_cfg(n)
        groups.setdefault((cfg.modality, cfg.classes), []).append(n)
    return {f"{mod}: {', '.join(cls)}": ms for (mod, cls), ms in groups.items()}


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def ensemble_image(members: dict[str, Analysis], weights: dict[str, float] | None = None) -> dict:
    """Soft vote of member analyses of one image (same classes) and how much the members disagree.

    Returns {classes, probabilities {class: p}, label, weights (normalised), members {name: {class: p}},
    votes {name: label}, agreement (weighted share of members voting the ensemble's label), spread (max - min of
    the members' probabilities for the ensemble's label), mutual_information (entropy of the mean minus the mean
    entropy, in nats: 0 when members agree, larger when they disagree), entropy (of the ensemble, nats)}."""
    usable = {n: a for n, a in members.items() if a.has_result}
    if not usable:
        raise ValueError("no member gave a result for this image")
    classes = list(next(iter(usable.values())).probabilities)
    if any(list(a.probabilities) != classes for a in usable.values()):
        raise ValueError("ensemble members must share their class list")
    names = list(usable)
    w = np.array([float((weights or {}).get(n, 1.0)) for n in names])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("member weights must be >= 0 and not all zero")
    w = w / w.sum()
    P = np.array([[usable[n].probabilities[c] for c in classes] for n in names])
    mean = soft_vote(list(P), list(w))
    k = int(np.argmax(mean))
    votes = {n: classes[int(np.argmax(P[i]))] for i, n in enumerate(names)}
    agree = float(sum(w[i] for i, n in enumerate(names) if votes[n] == classes[k]))
    ent_mean = float(_entropy(mean))
    mi = max(0.0, ent_mean - float((w * _entropy(P)).sum()))
    return {"classes": classes, "probabilities": {c: float(p) for c, p in zip(classes, mean)},
            "label": classes[k], "weights": {n: float(x) for n, x in zip(names, w)},
            "members": {n: dict(zip(classes, map(float, P[i]))) for i, n in enumerate(names)}, "votes": votes,
            "agreement": agree, "spread": float(P[:, k].max() - P[:, k].min()), "mutual_information": mi,
            "entropy": ent_mean, "max_entropy": float(np.log(len(classes)))}


def find_ablation_files(roots=("docs", "weights", "artifacts"), base=None) -> list:
    """Saved ensemble evaluations (`python -m retina_core ensemble ... --ablation --json > FILE.json`): JSON files
    under `roots` (relative to `base`, default the project folder) holding an "ablation" list.
    Returns [(path, parsed dict)]."""
    return saved_reports(lambda obj: isinstance(obj.get("ablation"), list), roots, base=base, limit=200)


def ablation_rows(obj: dict) -> list[dict]:
    """Flat table rows of a saved ablation (`python -m retina_core ensemble ... --ablation --json`, or the list
    `evaluate.ensemble.ablation` returns): rank, members, score and the headline metrics."""
    rows = []
    for e in obj.get("ablation", []):
        m = e["metrics"] if isinstance(e.get("metrics"), dict) else e   # nested (ablation()) or flat (the CLI)
        row = {"rank": e.get("rank"), "members": " + ".join(e.get("members", [])), "score": e.get("score")}
        for k in ("accuracy", "auc_macro", "f1_macro", "sensitivity_macro", "specificity_macro", "ece"):
            if isinstance(m.get(k), (int, float)):
                row[k] = m[k]
        rows.append(row)
    return rows


def saved_reports(keep, roots=("docs", "weights", "artifacts"), base=None, limit: int = 300) -> list[tuple[Path, dict]]:
    """JSON reports saved in the project: [(path, parsed dict)] for files under `roots` (relative to `base`,
    default the project folder) whose parsed dict satisfies `keep(obj)`. manifest.json and files over 20 MB
    are skipped, unreadable files ignored."""
    base = Path(base) if base else Path(__file__).resolve().parents[2]
    found = []
    for r in roots:
        d = base / r
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*.json"))[:limit]:
            if p.name == "manifest.json" or p.stat().st_size > 20_000_000:
                continue
            try:
                obj = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(obj, dict) and keep(obj):
                found.append((p, obj))
    return found
