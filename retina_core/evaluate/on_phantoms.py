"""A small evaluation on fresh phantoms, computed on demand for the Models & evaluation page.

    >>> r = evaluate_on_phantoms(load_model("oct_resnet18"), n_per_class=6)
    >>> r["metrics"]["confusion_matrix"], r["roc"]["CNV"]["auc"], r["metrics"]["reliability_bins"]

Phantom seeds start at `SEED_BASE`, far from the seeds `retina_core data phantoms` uses for training sets, so the
images are new to the model; they come from the same generator, though, so these are phantom metrics: they say
whether the model learned the phantoms, nothing about clinical accuracy.
"""
from __future__ import annotations

import numpy as np

from ..modality import Modality
from .metrics import classification_metrics

SEED_BASE = 9_100_000
FUNDUS_SIZE = 256


def _phantom_inputs(cfg, n_per_class: int, seed: int):
    """(inputs, y, extra) for the model's modality: 2D images uint8 [H, W, 3], volume (vol, meta, eye) or pairs."""
    from ..phantoms import fundus_phantom, oct_phantom, oct_volume, paired_phantoms

    xs, ys = [], []
    for k, cls in enumerate(cfg.classes):
        for j in range(n_per_class):
            s = seed + 1000 * k + j
            if cfg.modality == Modality.FUNDUS:
                xs.append(fundus_phantom(cls, seed=s, size=FUNDUS_SIZE).image)
            elif cfg.modality == Modality.OCT:
                im = oct_phantom(cls, seed=s, width=256, height=248).image
                xs.append(np.repeat(im[..., None], 3, axis=2))
            elif cfg.modality == Modality.OCT_VOLUME:
                d, h, w = cfg.input_size[1:]
                ph = oct_volume(cls, seed=s, n_slices=d, height=max(h, 64), width=max(w, 64))
                xs.append((ph.image, ph.meta, ph.meta.get("eye")))
            elif cfg.modality == Modality.FUNDUS_OCT:
                f, o = paired_phantoms(s, fundus_size=FUNDUS_SIZE, oct_width=256, oct_height=248,
                                       disease=cls == "disease")
                xs.append((f.image, np.repeat(o.image[..., None], 3, axis=2)))
            else:
                raise ValueError(f"no phantom generator for modality {cfg.modality!r}")
            ys.append(k)
    return xs, np.array(ys)


def predict_phantoms(model, xs) -> np.ndarray:
    """Calibrated probabilities [N, K] of a loaded model (image, volume or pair) for the inputs `_phantom_inputs`
    made: each through the model's own `preprocess` and `predict_proba`."""
    import torch

    with torch.inference_mode():
        out = [model.predict_proba(model.preprocess(x)).cpu().numpy() for x in xs]
    return np.concatenate(out).astype(np.float64)


def roc_curves(y: np.ndarray, probs: np.ndarray, classes) -> dict:
    """One-vs-rest ROC per class: {class: {fpr, tpr, auc}} (classes absent from y are left out)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    out = {}
    for k, c in enumerate(classes):
        pos = (y == k).astype(int)
        if pos.min() == pos.max():
            continue
        fpr, tpr, _ = roc_curve(pos, probs[:, k])
        out[c] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(roc_auc_score(pos, probs[:, k]))}
    return out


def evaluate_on_phantoms(model, n_per_class: int = 6, seed: int = SEED_BASE) -> dict:
    """Metrics, ROC curves and reliability bins of `model` on n_per_class fresh phantoms per class."""
    xs, y = _phantom_inputs(model.cfg, n_per_class, seed)
    probs = predict_phantoms(model, xs)
    classes = list(model.cfg.classes)
    return {"model": model.name, "weights_sha256": model.sha256, "n": int(len(y)), "n_per_class": n_per_class,
            "seed": seed, "metric_kind": "phantom",
            "metrics": classification_metrics(y, probs, classes, ordinal=model.cfg.ordinal),
            "roc": roc_curves(y, probs, classes)}
