"""Reading one eye with several models: a fundus + OCT pair through the fusion model, and ensembles on one image.

    >>> fr = run_fusion(load_model("fundus_oct_fusion"), fundus_pixels, oct_pixels)   # P(disease), one map per image
    >>> rows, verdict = agreement({"fundus": fundus_analysis, "oct": oct_analysis}, fr)
    >>> ens = ensemble_image({"m1": a1, "m2": a2}, weights={"m1": 1, "m2": 1})        # soft vote + disagreement

Models with different class lists meet on the binary question every one of them answers: normal vs disease
(`models.multimodal.binary_label`: NORMAL, No DR, normal -> normal; every other class -> disease).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis, suggestion_for
from .evaluate.ensemble import soft_vote
from .explain.cam import normalise_map
from .models.multimodal import binary_label


@dataclass
class FusionResult:
    """The fusion model on one pair. Maps: float32 [H, W] in [0, 1] at each image's own size."""

    model: str
    weights_sha256: str
    probabilities: dict[str, float]          # {"normal": p, "disease": 1 - p}, calibrated
    label: str
    target: str                              # the class the maps explain
    fundus_map: np.ndarray = field(repr=False)
    oct_map: np.ndarray = field(repr=False)
    referable: bool = False

    @property
    def p_disease(self) -> float:
        return float(self.probabilities.get("disease", 0.0))


def run_fusion(model, fundus_pixels: np.ndarray, oct_pixels: np.ndarray) -> FusionResult:
    """Fusion forward + per-modality Grad-CAM in one pass (`explain.pair_methods.modality_cams`).

    model: a LoadedModel of `fundus_oct_fusion`; pixels: uint8 [H, W, 3] each (the OCT greyscale replicated)."""
    import torch

    from .explain.pair_methods import modality_cams

    net = model.net
    f, o = net.preprocess_pair(fundus_pixels, oct_pixels, model.device)
    logits, f_cam, o_cam = modality_cams(net, f, o)
    probs = torch.softmax(logits.float() / model.temperature, dim=1)[0].cpu().numpy().astype(np.float64)
    probs = probs / probs.sum()
    classes = model.cfg.classes
    k = int(np.argmax(probs))
    return FusionResult(model=model.name, weights_sha256=model.sha256,
                        probabilities={c: float(p) for c, p in zip(classes, probs)}, label=classes[k],
                        target=classes[k], fundus_map=normalise_map(f_cam[0], fundus_pixels.shape[:2]),
                        oct_map=normalise_map(o_cam[0], oct_pixels.shape[:2]),
                        referable=classes[k] in model.cfg.referable)


def fusion_readings(model, images: dict, readings: dict[str, Analysis], result: FusionResult,
                    maps: dict[str, np.ndarray], method: str = "gradcam") -> dict[str, Analysis]:
    """The fusion model's result as one reading per image, so the worklist can keep it with each picture:
    kind ("fundus" | "oct") -> Analysis (modality "fundus+oct", the fusion's probabilities, that image's map).
    images: kind -> RetinalImage; readings: kind -> that image's own Analysis (its quality verdict is reused)."""
    referable, suggestion = suggestion_for(result.label, model)
    other = {"fundus": "oct", "oct": "fundus"}
    names = {"fundus": "fundus photograph", "oct": "OCT B-scan"}
    out = {}
    for kind, img in images.items():
        note = (f"Fusion model reading of this {names[kind]} together with the {names[other[kind]]} "
                f"{images[other[kind]].content_hash[:12]} of the same eye; the heatmap is this image's share.")
        out[kind] = Analysis("fundus+oct", readings[kind].quality, dict(result.probabilities), result.label,
                             maps[kind], model.name, model.sha256, method, result.target, referable, suggestion,
                             img.content_hash, img.laterality, img.pixels, [note], model.trained_on)
    return out


def p_disease(a: Analysis) -> float | None:
    """P(disease) of a multi-class analysis: the summed probability of its non-normal classes (None: no result)."""
    if not a.has_result:
        return None
    return float(sum(p for c, p in a.probabilities.items() if binary_label(c) == "disease"))


def agreement(readers: dict[str, Analysis], fusion: FusionResult | None = None) -> tuple[list[dict], str]:
    """Per reader (and the fusion model): its own label, its binary call and P(disease); plus one sentence saying
    where the modalities agree or disagree; it starts with "All readings agree" only when every reading (the fusion
    model's included) gives the same call. Readers without a result are listed and left out of the verdict."""
    rows = []
    calls = {}
    for who, a in readers.items():
        pd_ = p_disease(a)
        call = binary_label(a.label) if a.has_result else None
        rows.append({"reader": who, "model": a.model, "finding": a.label or "no result",
                     "normal vs disease": call or "no result", "P(disease)": pd_})
        if call:
            calls[who] = call
    if fusion is not None:
        rows.append({"reader": "fusion (both images)", "model": fusion.model, "finding": fusion.label,
                     "normal vs disease": fusion.label, "P(disease)": fusion.p_disease})
    if len(calls) < 2:
        missing = [w for w in readers if w not in calls]
        verdict = (f"No comparison: {', '.join(missing)} gave no result." if missing
                   else "No comparison: fewer than two readings.")
    elif len(set(calls.values())) == 1:
        call = next(iter(calls.values()))
        if fusion is not None and fusion.label != call:
            verdict = (f"The two modalities agree ({call}), but the fusion model reading both says {fusion.label} "
                       f"(P(disease) {fusion.p_disease:.0%}): review both images.")
        else:
            verdict = f"All readings agree: {call}."
    else:
        parts = ", ".join(f"{w} suggests {c}" for w, c in calls.items())
        verdict = f"The modalities disagree: {parts}."
        if fusion is not None:
            verdict += f" The fusion model, reading both, says {fusion.label} (P(disease) {fusion.p_disease:.0%})."
        verdict += " Findings visible in one modality only (e.g. early macular oedema on OCT) can explain this."
    return rows, verdict


# ------------------------------------------------------------------------------------------------ ensembles
def ensemble_groups(names: list[str]) -> dict[str, list[str]]:
    """Models that can be soft-voted together: same modality and the same class list. {group label: names}."""
    from .models import get_cfg

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
    from .quick_eval import saved_reports

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
