"""Provenance of the real public data sets the project trains and measures on (``../shared/realdata/``).

A model trained on one of them carries this record in its manifest entry (``real_data``), so the app, the reports
and ``predict --json`` can say what it was trained on, and the model card can give the licence and attribution.
The sets are recognised by their folder name; anything else is described by its path only.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..modality import Modality

__all__ = ["REAL_SETS", "real_set_of", "realdata_root", "split_hashes"]

_MEXICO = ("Hughes-Cano J.A., Olivares-Pinto U., Thebault S.C., 'Dataset of Eye Fundus and OCT Images for the study "
           "of Diabetic Macular Edema and Diabetic Retinopathy' (Mexico, 2015-2022; diagnoses by retinal "
           "specialists), public repository Traslational-Visual-Health-Laboratory/OCT-AND-EYE-FUNDUS-DATASET")

REAL_SETS: dict[str, dict] = {
    "mexico_fundus_dme_dr": {
        "title": "Mexico fundus (DME / DR)", "modality": Modality.FUNDUS, "attribution": _MEXICO,
        "licence": "no licence file; the authors ask users to cite them: research use with attribution",
        "caveats": "one clinical source; many dark or small-pupil photographs; patient ids not fully reliable",
    },
    "mexico_oct_dme": {
        "title": "Mexico OCT (DME)", "modality": Modality.OCT, "attribution": _MEXICO,
        "licence": "no licence file; the authors ask users to cite them: research use with attribution",
        "caveats": "one clinical source; OCT device not stated; 121 DME of 893 B-scans",
    },
    "eye_disease_4class": {
        "title": "4-class eye disease (Kaggle 'Eye Diseases Classification')", "modality": Modality.FUNDUS,
        "attribution": "Kaggle 'Eye Diseases Classification' (compiled from IDRiD, ODIR, HRF and other sources), as "
                       "used by the RETFound-heatmap and ResNet50-XAI source projects",
        "licence": "not stated: research use",
        "caveats": "mixed cameras and sources per class (a model can learn the source instead of the disease); "
                   "no patient ids (grouped by the number in <number>_left/_right names)",
    },
    "idrid_lesions": {
        "title": "IDRiD lesion segmentation (images 01-10)", "modality": Modality.FUNDUS,
        "attribution": "Porwal P. et al., Indian Diabetic Retinopathy Image Dataset (IDRiD), IEEE DataPort 2018",
        "licence": "CC BY 4.0",
        "caveats": "10 photographs, every one with DR lesions; pixel masks of MA, HE, EX, SE and the optic disc",
    },
}


def realdata_root() -> Path | None:
    """``$RETINA_REALDATA``, else ``../shared/realdata`` beside the repository; None when absent."""
    env = os.environ.get("RETINA_REALDATA")
    cands = [Path(env)] if env else []
    cands.append(Path(__file__).resolve().parents[3] / "shared" / "realdata")
    return next((c for c in cands if c.is_dir()), None)


def real_set_of(data: str | Path | Sequence) -> dict | None:
    """The REAL_SETS record (plus ``name``) of the set at ``data`` (a folder, or a pairs.csv folder whose paths
    point into real sets, or a `data combine` folder: then every set it draws on); None for phantoms and unknown
    folders."""
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    names = []
    for p in paths:
        for part in (p.resolve(), *p.resolve().parents):
            if part.name in REAL_SETS:
                names.append(part.name)
                break
        else:
            from .datasets import combined_from

            pairs = p / "pairs.csv"
            if pairs.is_file():
                names.extend(_sets_in_pairs(pairs))
            for source in combined_from(p):        # `data combine`: the sets it was made from
                found = real_set_of(source)
                names.extend(found["name"].split(" + ") if found else [])
    names = list(dict.fromkeys(names))
    if not names:
        return None
    if len(names) == 1:
        return {"name": names[0], **REAL_SETS[names[0]]}
    return {"name": " + ".join(names), "title": " + ".join(REAL_SETS[n]["title"] for n in names),
            "modality": "+".join(dict.fromkeys(REAL_SETS[n]["modality"] for n in names)),
            "attribution": "; ".join(dict.fromkeys(REAL_SETS[n]["attribution"] for n in names)),
            "licence": "; ".join(dict.fromkeys(REAL_SETS[n]["licence"] for n in names)),
            "caveats": "; ".join(REAL_SETS[n]["caveats"] for n in names)}


def _sets_in_pairs(pairs: Path) -> list[str]:
    import csv

    found = []
    with open(pairs, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            for col in ("fundus", "oct"):
                p = (pairs.parent / str(row.get(col) or "")).resolve()
                hit = next((q.name for q in p.parents if q.name in REAL_SETS), None)
                if hit and hit not in found:
                    found.append(hit)
            if len(found) >= 2:
                break
    return found


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_hashes(splits: dict[str, Iterable]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Content hashes of each split's files: ``({split: {"n", "sha256"}}, {split: [sorted file sha256s]})``. The
    first goes into the manifest (one hash names the exact file list), the second into ``splits.json`` beside the
    weights. Only content hashes are kept, never file names (which may carry patient ids). A record's pair partner
    (``meta["oct"]``) is hashed with it."""
    summary, lists = {}, {}
    for split, records in splits.items():
        hashes = []
        for r in records:
            parts = [_file_sha256(Path(r.path))]
            partner = (r.meta or {}).get("oct") if (r.meta or {}).get("modality") == Modality.FUNDUS else None
            if partner:
                parts.append(_file_sha256(Path(partner)))
            hashes.append("+".join(parts))
        hashes.sort()
        lists[split] = hashes
        summary[split] = {"n": len(hashes), "sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest()}
    return summary, lists
