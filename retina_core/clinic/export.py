"""Reviewed cases as a labelled data set that `python -m retina_core train` reads (the `labels` layout).

    summary = export_labels(clinic, "exports/oct", model="oct_resnet18")
    # exports/oct/labels.csv  file,label,patient_id,eye,modality,model_label,decision
    # exports/oct/images/<sha256>.png   the image as the model saw it (metadata-free PNG from the content store)
    # exports/oct/export.json           what was exported: counts, classes, when (no identifiers)

Without `model`, one such folder per model under `out` (a model's classes are its own). An image counts when its
analysis has a signed review that gives a label: the corrected grade, or the model's label when the clinician agreed
(a plain "disagree" says what the image is not, so it is left out). The newest signed version wins. `patient_id` is
a pseudonym made for the export (from the keyed PatientID hash where there is one, else the case id), so `train`'s
patient-level split keeps one patient's images together; no case reference, comment or reviewer is written.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from .db import Clinic
from .records import audit, clean_name
from .schema import AnalysisRecord, Eye, Review, Visit, utcnow

COLUMNS = ("file", "label", "patient_id", "eye", "modality", "model_label", "decision")


@dataclass(frozen=True)
class ExportSummary:
    folders: dict[str, str]            # model -> folder written
    counts: dict[str, dict[str, int]]  # model -> label -> images

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def _rows(clinic: Clinic, model: str | None) -> dict[str, dict[str, dict]]:
    """model -> stored image hash -> the row of its newest signed, labelling review."""
    q = (select(AnalysisRecord).where(AnalysisRecord.model.is_not(None))
         .options(selectinload(AnalysisRecord.reviews), selectinload(AnalysisRecord.image),
                  selectinload(AnalysisRecord.visit).selectinload(Visit.eye).selectinload(Eye.case)))
    if model:
        q = q.where(AnalysisRecord.model == model)
    best: dict[str, dict[str, tuple]] = {}
    with clinic.session() as s:
        for a in s.scalars(q):
            signed = [r for r in a.reviews if r.signed_at is not None]
            if not signed:
                continue
            r: Review = max(signed, key=lambda x: x.version)
            label = r.corrected_label if r.decision == "corrected" else a.label if r.decision == "agree" else None
            if not label:
                continue
            case = a.visit.eye.case
            pid = f"p-{case.patient_key[:16]}" if case.patient_key else f"case-{case.id}"
            row = {"file": f"images/{a.image.stored_hash}.png", "label": label, "patient_id": pid,
                   "eye": a.visit.eye.laterality if a.visit.eye.laterality != "U" else "",
                   "modality": a.modality or "", "model_label": a.label or "", "decision": r.decision}
            key = a.image.stored_hash
            have = best.setdefault(a.model, {}).get(key)
            stamp = (r.signed_at, r.id)
            if have is None or stamp > have[0]:
                best[a.model][key] = (stamp, row)
    return {m: {k: v[1] for k, v in rows.items()} for m, rows in best.items()}


def export_labels(clinic: Clinic, out: str | Path, model: str | None = None, actor="cli") -> ExportSummary:
    """Write the reviewed images (see the module docstring); returns what was written.
    actor: the signed-in account (`accounts.UserView`, needs the researcher role) or a name (the command line)."""
    if hasattr(actor, "require"):
        actor.require("export", "Exporting a labelled data set")
    else:
        actor = clean_name(actor, "Exported by")
    out = Path(out)
    found = _rows(clinic, model)
    if model:
        found = {model: found.get(model, {})}
    folders, counts = {}, {}
    for m, rows in sorted(found.items()):
        folder = out if model else out / re.sub(r"[^A-Za-z0-9._-]", "_", m)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        ordered = sorted(rows.values(), key=lambda r: (r["patient_id"], r["file"]))
        for r in ordered:
            target = folder / r["file"]
            if not target.exists():
                target.write_bytes(clinic.store.get(Path(r["file"]).stem))
        with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(ordered)
        per_label: dict[str, int] = {}
        for r in ordered:
            per_label[r["label"]] = per_label.get(r["label"], 0) + 1
        (folder / "export.json").write_text(json.dumps(
            {"source": "clinician reviews (signed) from the retina_core clinic", "model": m,
             "images": len(ordered), "labels": per_label, "patients": len({r["patient_id"] for r in ordered}),
             "exported_at": utcnow().isoformat(timespec="seconds")}, indent=2) + "\n")
        folders[m], counts[m] = str(folder), per_label
    with clinic.writing() as s:
        audit(s, actor, "export.labels", "export", None, models=sorted(counts),
              images={m: sum(c.values()) for m, c in counts.items()})
    return ExportSummary(folders, counts)
