"""Comparing the modalities of one eye (the Compare modalities page): a fundus + OCT pair through the fusion model,
each image's own reading, and where they agree.

    >>> fr = run_fusion(load_model("fundus_oct_fusion"), fundus_pixels, oct_pixels)   # P(disease), one map per image
    >>> rows, verdict = agreement({"fundus": fundus_analysis, "oct": oct_analysis}, fr)

(Ensembles of several models on one image: `evaluate.ensemble.ensemble_image`.)

Models with different class lists meet on the binary question every one of them answers: normal vs disease
(`models.multimodal.binary_label`: NORMAL, No DR, normal -> normal; every other class -> disease).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis, suggestion_for
from .explain.cam import normalise_map
from .modality import Modality
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
    f, o = model.preprocess((fundus_pixels, oct_pixels))
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
        out[kind] = Analysis(Modality.FUNDUS_OCT, readings[kind].quality, dict(result.probabilities), result.label,
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
