"""The 4-class set plus the Mexico clinic's graded photographs as one 4-class training set, each photograph in the
split it has in its own set's runs; and the check of a 4-class model on both (numbers only).

    python scripts/fourclass_plus_mexico.py build runs/combo4
    python -m retina_core train --model fundus_resnet18_head --data runs/combo4 --out runs/real/fundus4_combo \
        --recipe none --image-size 160 --framing fov --epochs 16 --patience 6 --lr 5e-4 --label-smoothing 0.1 \
        --init weights/fundus_resnet18_head.safetensors
    python scripts/fourclass_plus_mexico.py check val runs/real/fundus4_combo     # bundled weights, then these

build: `data combine` of eye_disease_4class (its 4 labels) and mexico_fundus_dme_dr (its `dr_grade`: 0 -> normal,
NPDR/PDR -> diabetic_retinopathy), keeping the Mexico no-DME photographs only (the DME ones come from another
acquisition set-up, docs/real_data.md), with a `split` column: the 4-class photographs in the bundled 4-class
model's split (stratified, 0.7/0.15/0.15, seed 0), the Mexico ones in the Mexico models' split (patient hash,
0.6/0.2/0.2, seed 0). So a run started from the bundled weights never sees a validation or test photograph of
either set, and the two sets' patient ids are kept apart ("mexico-" prefix).
check: on one split, 4-class accuracy and macro AUC; on the Mexico no-DME graded photographs P(diabetic_retinopathy)
for DR against none (AUC, patient bootstrap 95% interval), how many DR photographs are called DR and how many
no-DR ones normal; IDRiD photographs (all with DR lesions) called DR.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from retina_core.evaluate.metrics import bootstrap_ci, classification_metrics
from retina_core.evaluate.run import load_member
from retina_core.io.datasets import load_dataset, split_patients
from retina_core.io.realsets import realdata_root
from retina_core.models.predict import predict_paths

FOUR, MEXICO = "eye_disease_4class", "mexico_fundus_dme_dr"
GRADES = {"0": "normal", "NPDR": "diabetic_retinopathy", "PDR": "diabetic_retinopathy"}


def _key(p) -> str:
    return str(Path(p).resolve())


def _splits(root: Path) -> dict[str, str]:
    where = {}
    for name, fr, how in ((FOUR, "0.7,0.15,0.15", "stratified"), (MEXICO, "0.6,0.2,0.2", "patient_hash")):
        for s, recs in split_patients(load_dataset(root / name).records, 0, fr, how).items():
            where.update({_key(r.path): s for r in recs})
    return where


def _dme(root: Path) -> dict[str, str]:
    return {_key(root / MEXICO / r["file"]): r["label"] for r in csv.DictReader(open(root / MEXICO / "labels.csv"))}


def build(root: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "retina_core", "data", "combine", "--out", str(out), "--set",
                    str(root / FOUR), "--set", str(root / MEXICO), "--label-column", "dr_grade", "--label-map",
                    ",".join(f"{k}={v}" for k, v in GRADES.items())], check=True, stdout=subprocess.DEVNULL)
    where, dme = _splits(root), _dme(root)
    rows = []
    for r in csv.DictReader(open(out / "labels.csv")):
        p = _key(out / r["file"])
        if r["source"] == MEXICO:
            if dme[p] != "noDME":
                continue
            r["patient_id"] = "mexico-" + r["patient_id"]
        rows.append({**r, "split": where[p]})
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} photographs in {out / 'labels.csv'}")


def check(root: Path, split: str, weights_dirs: list[str]) -> None:
    four = split_patients(load_dataset(root / FOUR).records, 0, "0.7,0.15,0.15", "stratified")[split]
    dme, where = _dme(root), _splits(root)
    graded = [(r, r.label) for r in load_dataset(root / MEXICO, label_column="dr_grade", label_map=GRADES).records
              if dme[_key(r.path)] == "noDME" and where[_key(r.path)] == split]
    idrid = sorted((root / "idrid_lesions" / "images").glob("*.jpg"))
    for wd in [None, *weights_dirs]:
        m = load_member("fundus_resnet18_head", wd)
        cls = list(m.cfg.classes)
        k, normal = cls.index("diabetic_retinopathy"), cls.index("normal")
        y4 = np.array([cls.index(r.label) for r in four])
        met = classification_metrics(y4, predict_paths(m, [r.path for r in four]), cls)
        pm = predict_paths(m, [r.path for r, _ in graded])
        ym = np.array([g == "diabetic_retinopathy" for _, g in graded], int)
        ci = bootstrap_ci(ym, np.stack([1 - pm[:, k], pm[:, k]], 1), ("none", "DR"),
                          groups=[r.patient_id for r, _ in graded]).get("auc_macro")
        pi = predict_paths(m, idrid)
        print(f"{wd or 'bundled'} ({m.sha256[:12]}): 4-class {split} n = {len(y4)}: accuracy {met['accuracy']:.3f}, "
              f"macro AUC {met['auc_macro']:.3f} | Mexico {split}, no-DME graded n = {len(ym)} ({ym.sum()} DR): "
              f"AUC {roc_auc_score(ym, pm[:, k]):.3f} ({ci[0]:.2f}-{ci[1]:.2f}), DR called DR "
              f"{(pm[ym == 1].argmax(1) == k).sum()}/{ym.sum()}, no DR called normal "
              f"{(pm[ym == 0].argmax(1) == normal).sum()}/{(ym == 0).sum()} | IDRiD called DR "
              f"{(pi.argmax(1) == k).sum()}/{len(idrid)}")


if __name__ == "__main__":
    root = realdata_root()
    if root is None or len(sys.argv) < 3 or sys.argv[1] not in ("build", "check"):
        sys.exit(__doc__ if root else "../shared/realdata is absent (or set RETINA_REALDATA).")
    if sys.argv[1] == "build":
        build(root, Path(sys.argv[2]))
    else:
        check(root, sys.argv[2], sys.argv[3:])
