"""External check of a fundus model's DR output on photographs from sets it was not trained on (numbers only).

    python scripts/external_dr_check.py                                   # the bundled fundus_resnet18_head
    python scripts/external_dr_check.py retfound_vit_tiny                 # another bundled 4-class model
    python scripts/external_dr_check.py fundus_anydr_resnet18_head runs/real/x   # weights written by `train`

A 4-class model (class "diabetic_retinopathy", trained on the 4-class set):
1. Mexico fundus set, no-DME photographs with a DR grade (one acquisition set-up): P(DR) for NPDR/PDR against
   grade 0, AUC with a patient-level bootstrap 95% interval; what the grade-0 photographs are called (how
   many "normal"); and, where the weights record a confident level (`retina_core confidence --record`), how many
   of those readings reach it and how many of the confident ones are right.
A Mexico-trained DR model (class "DR", `--label-column dr_grade`):
1. 4-class set, diabetic_retinopathy against normal, on that set's test split (stratified patient split 0.7/0.15/
   0.15, seed 0: the split the bundled 4-class model was trained on, so a model started from it never saw these).
Both: 2. IDRiD lesion photographs (every one has DR lesions): how many the model calls DR, and the mean P(DR).
Photographs are read as the app reads them (long side SCREEN_SIDE) and framed as the weights were trained.

    python scripts/external_dr_check.py fundus_resnet18_head --record    # also into weights/manifest.json

--record writes the figures into the bundled weights' manifest entry as `external_checks` (when the checked weights
are the bundled ones, same sha256), so every reading of that model says next to what it was trained on where its
answer did or did not hold outside its set (`models.loading.trained_on`: app, reports, `predict --json`).
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
from retina_core.models.loading import confidence_of, confidence_threshold, load_model


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

    def probs(paths) -> np.ndarray:
        return np.concatenate([m.predict_proba(m.preprocess(read_image(p, max_side=SCREEN_SIDE).pixels)).cpu().numpy()
                               for p in paths])

    def p_dr(paths) -> np.ndarray:
        return probs(paths)[:, k]

    out = {"model": m.name, "weights_sha256": m.sha256[:12], "framing": m.cfg.framing,
           "input": list(m.cfg.input_size)}
    if dr == "diabetic_retinopathy":
        rows = [r for r in csv.DictReader(open(root / "mexico_fundus_dme_dr" / "labels.csv"))
                if r["label"] == "noDME" and r["dr_grade"] in ("0", "NPDR", "PDR")]
        y = np.array([r["dr_grade"] != "0" for r in rows], int)
        pp = probs([root / "mexico_fundus_dme_dr" / r["file"] for r in rows])
        out["mexico_noDME_dr_vs_none"] = _auc_row(y, pp[:, k], [r["patient_id"] for r in rows])
        if "normal" in m.cfg.classes:       # what a photograph without DR from that clinic is called
            calls = pp[y == 0].argmax(1)
            out["mexico_noDR_called"] = {"n": int((y == 0).sum()), **{c: int((calls == i).sum())
                                                                   for i, c in enumerate(m.cfg.classes)}}
            if confidence_of(m.entry):   # does "confident" (the level recorded on its own set) hold there?
                t = confidence_threshold(m.entry)
                sure = pp[y == 0].max(1) >= t
                right = calls == m.cfg.classes.index("normal")
                out["mexico_noDR_confident"] = {"threshold": t, "n": int((y == 0).sum()), "confident": int(sure.sum()),
                                                "right": int((sure & right).sum())}
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


def checks_of(out: dict) -> list[dict]:
    """The manifest's `external_checks` from `main`'s result: what was checked, the figure, and whether it held
    (an AUC whose interval lies above 0.5; at least half of the IDRiD photographs, all with DR lesions, called DR)."""
    checks = []
    for key, what in (("mexico_noDME_dr_vs_none", "DR vs no DR on another clinic's photographs (Mexico set)"),
                      ("fourclass_test_dr_vs_normal", "DR vs normal on the 4-class set's test photographs")):
        r = out.get(key)
        if r:
            lo, hi = r["auc_ci95"] or (r["auc"], r["auc"])
            checks.append({"check": what, "figure": f"AUC {r['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}), n = {r['n']}",
                           "holds": bool(lo > 0.5), "command": "python scripts/external_dr_check.py"})
    r = out.get("mexico_noDR_called")
    if r:
        checks.append({"check": "another clinic's photographs without DR (Mexico set) called normal",
                       "figure": f"{r['normal']} of {r['n']} ("
                                 + ", ".join(f"{r[c]} {c}" for c in sorted(r, key=lambda c: -r[c])
                                             if c not in ("n", "normal") and r[c]) + ")",
                       "holds": bool(r["normal"] >= r["n"] / 2),
                       "command": "python scripts/external_dr_check.py"})
    r = out.get("mexico_noDR_confident")
    if r:
        checks.append({"check": f"confident readings (at or above {r['threshold']:.0%}) of another clinic's "
                                "photographs without DR (Mexico set) that were right",
                       "figure": f"{r['right']} of {r['confident']} ({r['confident']} of {r['n']} were confident)",
                       "holds": bool(r["right"] >= r["confident"] / 2),
                       "command": "python scripts/external_dr_check.py"})
    r = out["idrid_all_dr"]
    checks.append({"check": "IDRiD photographs with DR lesions called DR", "figure": f"{r['called_dr']} of {r['n']}",
                   "holds": bool(r["called_dr"] >= r["n"] / 2), "command": "python scripts/external_dr_check.py"})
    return checks


def record(out: dict) -> None:
    from retina_core.models.loading import MANIFEST, weights_dir

    path = weights_dir() / MANIFEST
    manifest = json.loads(path.read_text())
    entry = manifest.get(out["model"]) or {}
    if not str(entry.get("sha256", "")).startswith(out["weights_sha256"]):
        raise SystemExit(f"--record: the checked weights are not the bundled {out['model']} ({path})")
    entry["external_checks"] = [{**c, "command": f"{c['command']} {out['model']}",
                                 "weights_sha256": out["weights_sha256"]} for c in checks_of(out)]
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"recorded {len(entry['external_checks'])} checks in {path}", file=sys.stderr)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--record"]
    result = main(*args[:2])
    print(json.dumps(result, indent=1))
    if "--record" in sys.argv[1:]:
        record(result)
