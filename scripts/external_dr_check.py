"""External check of a fundus model's DR output on photographs from sets it was not trained on (numbers only).

    python scripts/external_dr_check.py                                   # the bundled fundus_resnet18_head
    python scripts/external_dr_check.py retfound_vit_tiny                 # another bundled 4-class model
    python scripts/external_dr_check.py fundus_anydr_resnet18_head runs/real/x   # weights written by `train`

A 4-class model (class "diabetic_retinopathy", trained on the 4-class set):
1. Mexico fundus set, no-DME photographs with a DR grade (one acquisition set-up): P(DR) for NPDR/PDR against
   grade 0, AUC with a patient-level bootstrap 95% interval.
A Mexico-trained DR model (class "DR", `--label-column dr_grade`):
1. 4-class set, diabetic_retinopathy against normal, on that set's test split (stratified patient split 0.7/0.15/
   0.15, seed 0: the split the bundled 4-class model was trained on, so a model started from it never saw these).
Both: 2. IDRiD lesion photographs (every one has DR lesions): how many the model calls DR, and the mean P(DR).
Photographs are read as the app reads them (long side SCREEN_SIDE) and framed as the weights were trained.
"""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from retina_core.evaluate.metrics import bootstrap_ci
from retina_core.io.datasets import load_dataset, split_patients
from retina_core.io.decode import SCREEN_SIDE, read_image
from retina_core.io.realsets import realdata_root
from retina_core.models.loading import load_model


def _auc_row(y: np.ndarray, p: np.ndarray, groups) -> dict:
    ci = bootstrap_ci(y, np.stack([1 - p, p], 1), ("none", "DR"), groups=groups)
    return {"n": int(len(y)), "n_dr": int(y.sum()), "auc": round(roc_auc_score(y, p), 4),
            "auc_ci95": ci.get("auc_macro"),
            "mean_p_dr": {"DR": round(float(p[y == 1].mean()), 3), "no DR": round(float(p[y == 0].mean()), 3)}}


def main(model: str = "fundus_resnet18_head", weights_dir: str | None = None) -> dict:
    root = realdata_root()
    m = load_model(model, weights_dir=weights_dir)
    dr = next(c for c in ("diabetic_retinopathy", "DR") if c in m.cfg.classes)
    k = m.cfg.classes.index(dr)

    def p_dr(paths) -> np.ndarray:
        return np.array([float(m.predict_proba(m.preprocess(read_image(p, max_side=SCREEN_SIDE).pixels))[0, k])
                         for p in paths])

    out = {"model": m.name, "weights_sha256": m.sha256[:12], "framing": m.cfg.framing,
           "input": list(m.cfg.input_size)}
    if dr == "diabetic_retinopathy":
        rows = [r for r in csv.DictReader(open(root / "mexico_fundus_dme_dr" / "labels.csv"))
                if r["label"] == "noDME" and r["dr_grade"] in ("0", "NPDR", "PDR")]
        y = np.array([r["dr_grade"] != "0" for r in rows], int)
        p = p_dr([root / "mexico_fundus_dme_dr" / r["file"] for r in rows])
        out["mexico_noDME_dr_vs_none"] = _auc_row(y, p, [r["patient_id"] for r in rows])
    else:
        recs = load_dataset(root / "eye_disease_4class").records
        test = [r for r in split_patients(recs, 0, "0.7,0.15,0.15", "stratified")["test"]
                if r.label in ("diabetic_retinopathy", "normal")]
        y = np.array([r.label == "diabetic_retinopathy" for r in test], int)
        out["fourclass_test_dr_vs_normal"] = _auc_row(y, p_dr([r.path for r in test]),
                                                      [r.patient_id or str(r.path) for r in test])
    idrid = sorted((root / "idrid_lesions").rglob("*.jpg"))
    pi = p_dr(idrid)
    out["idrid_all_dr"] = {"n": len(idrid), "called_dr": int((pi > 0.5).sum()), "mean_p_dr": round(float(pi.mean()), 3)}
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3]), indent=1))
