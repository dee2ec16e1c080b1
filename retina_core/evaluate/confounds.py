"""Shortcut check: how well do a few global image statistics, with no network, separate a set's classes?

A model whose held-out AUC is matched by, say, the share of the frame the fundus field covers has probably learnt the
camera or the export, not the disease; its maps then peak outside the retina. Run it before trusting a real-data
figure (docs/real_data.md):

    python -m retina_core data confounds ../shared/realdata/mexico_fundus_dme_dr --positive DME \\
        --split-by patient_hash --split-fractions 0.6,0.2,0.2

Binary question: `positive` against every other label. Statistics (on a 160 px copy decoded with JPEG draft mode):
fundus: field-of-view share, brightness and contrast inside the field, corner brightness, red/green ratio;
OCT: brightness, contrast, bright share, depth of the brightest row, black share. Each statistic's AUC is reported
as max(AUC, 1 - AUC) with the direction, plus a 5-fold logistic regression on all five.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from ..errors import RetinaInputError
from ..modality import Modality

__all__ = ["STATISTICS", "image_statistics", "acquisition_confounds"]

STATISTICS = {
    Modality.FUNDUS: ("field-of-view share", "brightness in field", "contrast in field", "corner brightness",
                      "red / green"),
    Modality.OCT: ("brightness", "contrast", "bright share", "brightest row depth", "black share"),
}


def image_statistics(path, modality: str, framing: str = "stretch") -> list[float]:
    """The five global statistics of one image file (see STATISTICS). framing "fov": of the image as a model with
    fov framing sees it (`models.framing`: the field of view cut out, centred and letterboxed), so a field-share
    shortcut that framing removes no longer counts; "fov_contrast": framed, then contrast-normalised the same way."""
    with Image.open(path) as im:
        im.draft("RGB", (320, 320) if framing == "fov" else (160, 160))
        rgb = im.convert("RGB")
        if framing in ("fov", "fov_contrast") and modality == Modality.FUNDUS:
            import torch

            from ..models.framing import frame_pixels, local_contrast
            a = frame_pixels(np.asarray(rgb), (160, 160))[0].astype(float)
            if framing == "fov_contrast":
                a = local_contrast(torch.from_numpy(a).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
        else:
            a = np.asarray(rgb.resize((160, 160)), float)
    g = a.mean(2)
    if modality == Modality.OCT:
        rows = g.mean(1)
        return [g.mean(), g.std(), (g > 60).mean(), float(np.argmax(rows)) / len(rows), (g < 10).mean()]
    fov = g > 15
    inside = g[fov] if fov.any() else np.zeros(1)
    c = 12
    corners = np.concatenate([g[:c, :c].ravel(), g[:c, -c:].ravel(), g[-c:, :c].ravel(), g[-c:, -c:].ravel()])
    red_green = a[..., 0][fov].mean() / max(a[..., 1][fov].mean(), 1.0) if fov.any() else 1.0
    return [fov.mean(), inside.mean(), inside.std(), corners.mean(), red_green]


def acquisition_confounds(data, positive: str, modality: str | None = None, split: str = "test", seed: int = 0,
                          fractions: str | None = None, split_by: str | None = None, framing: str = "stretch",
                          label_column: str | None = None, label_map: str | None = None) -> dict:
    """AUC of each global statistic (and of all five together) for `positive` vs the rest on `split` of `data`
    (the same patient-level split `train` makes with these settings, labels from `label_column` / `label_map`
    as `train --label-column` reads them; "all" for every image)."""
    from ..io.datasets import load_dataset, split_patients

    index = load_dataset(data, label_column=label_column, label_map=label_map)
    records = index.records if split == "all" else split_patients(index.records, seed, fractions, split_by).get(split)
    if not records:
        raise RetinaInputError(f"The {split!r} split of {data} is empty.")
    y = np.array([r.label == positive for r in records], int)
    if y.min() == y.max():
        raise RetinaInputError(f"Label {positive!r} must be present and absent in the {split!r} split; labels found: "
                               f"{', '.join(sorted({r.label for r in records}))}.")
    if modality is None:
        from ..io.realsets import real_set_of
        real = real_set_of(data)
        modality = real["modality"] if real and real["modality"] in STATISTICS else Modality.FUNDUS
    f = np.array([image_statistics(r.path, modality, framing) for r in records], float)
    out = {}
    for i, name in enumerate(STATISTICS[modality]):
        auc = float(roc_auc_score(y, f[:, i]))
        out[name] = {"auc": round(max(auc, 1 - auc), 4), "higher_in_positive": auc >= 0.5}
    z = (f - f.mean(0)) / (f.std(0) + 1e-9)
    folds = StratifiedKFold(n_splits=min(5, int(y.sum()), int(len(y) - y.sum())), shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(max_iter=1000), z, y, cv=folds, method="predict_proba")[:, 1]
    return {"data": str(data), "split": split, "n": int(len(y)), "positive": positive, "n_positive": int(y.sum()),
            "modality": modality, "framing": framing, "statistics": out, "all_five_logistic_cv_auc": round(float(roc_auc_score(y, p)), 4)}
