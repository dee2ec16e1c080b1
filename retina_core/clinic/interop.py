"""Stored results in the formats hospitals read: a FHIR R4 Bundle, a DICOM Structured Report and the heatmap as a
DICOM Secondary Capture image.

    ctx = result_context(clinic, analysis_id=17)           # everything one analysis' exports need (a frozen view)
    fhir_json(ctx)                                          # FHIR R4 Bundle (collection): DiagnosticReport + ...
    sr, heatmap = dicom_pair(ctx)                           # Enhanced SR (TID 1500) + SC image, consistent UIDs
    export_results(clinic, 17, "out/", actor="dr-k")        # out/analysis-17.fhir.json, .sr.dcm, .heatmap.dcm

FHIR: built and validated with `fhir.resources.R4B` (FHIR R4B, 4.3.0: the R4-compatible release; the package's
default models are R5). DICOM: built with highdicom, whose constructors check the IODs and templates.
Every object says it is a decision-support suggestion, not a diagnosis. Privacy (docs/result_formats.md): the patient
is only the pseudonymous case reference (DICOM PatientID; PatientName and birth date empty); from an uploaded DICOM
file only its four UIDs are kept (`dicom_refs_from_bytes`), so results join the source study by StudyInstanceUID;
the review's free-text comment is never exported. UIDs are derived from the analysis (`pydicom.uid.generate_uid`
with entropy), so a re-export gives the same objects; the SR's UID also depends on the review it carries.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import selectinload

from ..errors import RetinaInputError
from .db import Clinic
from .records import audit, clean_name
from .schema import AnalysisRecord, Eye, Visit

DISCLAIMER = ("Decision-support suggestion from research software, not a diagnosis: no claim of clinical accuracy "
              "is made; a clinician must confirm any finding.")
MANUFACTURER = "retina_core (research software)"
FORMATS = ("fhir", "sr", "heatmap")
SUFFIXES = {"fhir": "fhir.json", "sr": "sr.dcm", "heatmap": "heatmap.dcm"}

# FHIR systems. The app's own concepts (classes, observation kinds, review decisions) are in `urn:retina-core:*`
# systems: no standard code exists for "probability of this model's class"; a receiving system maps them.
CASE_REF_SYSTEM = "urn:retina-core:case-ref"
OBS_SYSTEM = "urn:retina-core:observation"
CLASS_SYSTEM = "urn:retina-core:class"
PROBABILITY_SYSTEM = "urn:retina-core:class-probability"
DECISION_SYSTEM = "urn:retina-core:review-decision"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

# SNOMED CT "Entire right / left eye" (HL7 eye-care target-site value set); laterality qualifiers Right / Left as in
# DICOM CID 244. "Right eye structure" 18944008 / 8966001 are inactive since the 2024 releases, so not used.
EYE_SITES = {"OD": ("362502000", "Entire right eye", "Right eye (OD)"),
             "OS": ("362503005", "Entire left eye", "Left eye (OS)")}
LATERALITY_CODES = {"OD": ("24028007", "Right"), "OS": ("7771000", "Left")}
DECISION_TEXT = {"agree": "The clinician agrees with the suggested label",
                 "disagree": "The clinician disagrees with the suggested label",
                 "corrected": "The clinician corrected the grade"}

# DICOM: a private coding scheme (designator 99...) for the same concepts as the FHIR urn:retina-core systems.
SCHEME = "99RETINA"
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"           # Secondary Capture Image Storage
ENHANCED_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
SERIES_NUMBERS = {"heatmap": 901, "sr": 902}
MODALITY_BY_SOP_CLASS = {"1.2.840.10008.5.1.4.1.1.77.1.5.1": "OP", "1.2.840.10008.5.1.4.1.1.77.1.5.2": "OP",
                         "1.2.840.10008.5.1.4.1.1.77.1.5.4": "OPT", "1.2.840.10008.5.1.4.1.1.77.1.5.7": "OPT",
                         "1.2.840.10008.5.1.4.1.1.77.1.4": "XC", "1.2.840.10008.5.1.4.1.1.7": "OT"}
REF_KEYS = ("study_uid", "series_uid", "sop_uid", "sop_class_uid")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


# ------------------------------------------------------------------------------------------------ DICOM source refs
def dicom_refs_from_bytes(data: bytes) -> dict[str, str] | None:
    """The four UIDs of an uploaded DICOM file: {"study_uid", "series_uid", "sop_uid", "sop_class_uid"}, or None
    (not DICOM, unreadable, or a UID missing / malformed). Reads those elements only; nothing identifying."""
    from ..io.decode import sniff_format

    try:
        if sniff_format(bytes(data[:1024])) != "dicom":
            return None
    except RetinaInputError:
        return None
    import pydicom

    from ..io import dicom as _dicom_logs  # noqa: F401 - installs the filter that drops pydicom record text

    tags = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=tags,
                                 force=data[128:132] != b"DICM")
            meta = getattr(ds, "file_meta", None)
            refs = {"study_uid": ds.get("StudyInstanceUID"), "series_uid": ds.get("SeriesInstanceUID"),
                    "sop_uid": ds.get("SOPInstanceUID") or (meta and meta.get("MediaStorageSOPInstanceUID")),
                    "sop_class_uid": ds.get("SOPClassUID") or (meta and meta.get("MediaStorageSOPClassUID"))}
        except Exception:   # noqa: BLE001 - an unreadable header has no references; never chain (messages quote values)
            return None
    refs = {k: str(v).strip("\0 ") if v else "" for k, v in refs.items()}
    return refs if all(_UID.match(v) and len(v) <= 64 for v in refs.values()) else None


# ------------------------------------------------------------------------------------------------ the context
@dataclass(frozen=True)
class ReviewSummary:
    """The review an export carries: the newest signed version, else the newest draft."""
    version: int
    decision: str                       # agree | disagree | corrected
    corrected_label: str | None
    label: str | None                   # the label the review gives (corrected grade, or the model's when agreeing)
    comment: str                        # kept for the app; never exported (free text may hold identifiers)
    reviewer: str
    created_at: dt.datetime
    signed_at: dt.datetime | None

    @property
    def signed(self) -> bool:
        return self.signed_at is not None


@dataclass(frozen=True, eq=False)
class ResultContext:
    """Everything the exporters need about one stored analysis; plain values, safe after the session closed.

    pixels: uint8 [H, W, 3], the image as the model saw it; heatmap: float32 [H, W] in [0, 1] (None: no heatmap);
    both None when loaded with `pixels=False`. dicom_refs: `dicom_refs_from_bytes` of the upload, or None."""
    analysis_id: int
    case_ref: str
    laterality: str                     # OD | OS | U
    visit_date: dt.date
    model: str | None
    weights_sha256: str | None
    method: str
    target: str | None
    label: str | None
    referable: bool | None
    suggestion: str
    modality: str | None
    trained_on: str | None
    outputs: dict[str, Any]             # Analysis.to_dict()
    created_at: dt.datetime
    created_by: str
    review: ReviewSummary | None
    content_hash: str
    width: int
    height: int
    source_format: str
    dicom_refs: dict[str, str] | None
    has_heatmap: bool
    pixels: np.ndarray | None = None
    heatmap: np.ndarray | None = None

    @property
    def probabilities(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in (self.outputs.get("probabilities") or {}).items()}

    @property
    def quality(self) -> dict[str, Any]:
        return dict(self.outputs.get("quality") or {})

    @property
    def status(self) -> str:
        """"final" once a clinician signed a review, else "preliminary"."""
        return "final" if self.review is not None and self.review.signed else "preliminary"

    @property
    def issued(self) -> dt.datetime:
        return _utc(self.review.signed_at) if self.review is not None and self.review.signed else _utc(self.created_at)


def result_context(clinic: Clinic, analysis_id: int, pixels: bool = True) -> ResultContext:
    """Read one stored analysis, its eye, visit, case, image and review (see ResultContext). pixels=False skips the
    content store (enough for FHIR). Unknown id: RetinaInputError."""
    with clinic.session() as s:
        a = s.get(AnalysisRecord, int(analysis_id), options=[
            selectinload(AnalysisRecord.reviews), selectinload(AnalysisRecord.image),
            selectinload(AnalysisRecord.visit).selectinload(Visit.eye).selectinload(Eye.case)])
        if a is None:
            raise RetinaInputError(f"There is no stored analysis {analysis_id}: check the number on the case page.")
        signed = [r for r in a.reviews if r.signed_at is not None]
        r = max(signed or a.reviews, key=lambda x: x.version, default=None)
        review = None if r is None else ReviewSummary(
            r.version, r.decision, r.corrected_label, r.label, r.comment or "", r.reviewer, _utc(r.created_at),
            _utc(r.signed_at) if r.signed_at else None)
        img, visit = a.image, a.visit
        refs = img.dicom_refs
        ctx = ResultContext(
            analysis_id=a.id, case_ref=visit.eye.case.ref, laterality=visit.eye.laterality, visit_date=visit.visit_date,
            model=a.model, weights_sha256=a.weights_sha256, method=a.method, target=a.target, label=a.label,
            referable=a.referable, suggestion=a.suggestion, modality=a.modality, trained_on=a.trained_on,
            outputs=dict(a.outputs or {}), created_at=_utc(a.created_at), created_by=a.created_by, review=review,
            content_hash=img.content_hash, width=img.width, height=img.height, source_format=img.source_format,
            dicom_refs=dict(refs) if refs else None, has_heatmap=a.heatmap_hash is not None)
        stored_hash, heatmap_hash = img.stored_hash, a.heatmap_hash
    if not pixels:
        return ctx
    image = clinic.store.get_image(stored_hash)
    heatmap = clinic.store.get_heatmap(heatmap_hash, image.shape[:2]) if heatmap_hash else None
    return replace(ctx, pixels=image, heatmap=heatmap)


def _utc(t: dt.datetime | None) -> dt.datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


# ------------------------------------------------------------------------------------------------ identifiers
def _seed(ctx: ResultContext) -> list[str]:
    """What makes an analysis unique across installs (its id alone repeats between databases)."""
    return ["retina_core-result", str(ctx.analysis_id), ctx.weights_sha256 or "-", ctx.content_hash,
            _utc(ctx.created_at).isoformat()]


def _review_state(ctx: ResultContext) -> str:
    r = ctx.review
    return "no-review" if r is None else f"review-v{r.version}-{'signed' if r.signed else 'draft'}"


def _dicom_uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


@dataclass(frozen=True)
class ResultUIDs:
    """DICOM UIDs of one analysis' exports. study: the source study for a DICOM upload, else one new study per
    image and visit (every model's results of that image land together)."""
    study: str
    sr_series: str
    sr: str                             # the SR that cites the heatmap image (when the analysis has one)
    sr_alone: str                       # the SR made without the heatmap image (other content, other instance)
    heatmap_series: str
    heatmap: str
    device: str


def result_uids(ctx: ResultContext) -> ResultUIDs:
    seed = _seed(ctx)
    study = (ctx.dicom_refs["study_uid"] if ctx.dicom_refs else
             _dicom_uid("retina_core-study", ctx.content_hash, ctx.case_ref, ctx.visit_date.isoformat()))
    return ResultUIDs(study=study, sr_series=_dicom_uid(*seed, "sr-series"),
                      sr=_dicom_uid(*seed, "sr", _review_state(ctx), "heatmap" if ctx.has_heatmap else "alone"),
                      sr_alone=_dicom_uid(*seed, "sr", _review_state(ctx), "alone"),   # new content, new instance
                      heatmap_series=_dicom_uid(*seed, "heatmap-series"), heatmap=_dicom_uid(*seed, "heatmap"),
                      device=_dicom_uid("retina_core-model", ctx.model or "-", ctx.weights_sha256 or "-"))


def _fhir_id(ctx: ResultContext, kind: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join([*_seed(ctx), kind])))


# ------------------------------------------------------------------------------------------------ FHIR R4 (R4B)
def fhir_bundle(ctx: ResultContext) -> dict[str, Any]:
    """A FHIR R4 Bundle (type "collection") as a JSON-ready dict, validated by the `fhir.resources.R4B` models:

    Patient (only the pseudonymous case reference as identifier, security label PSEUDED), Device (the model and its
    weights sha256), DiagnosticReport (status "preliminary", "final" once a review is signed; conclusion: the result,
    the review and the decision-support statement), one Observation per class probability (valueQuantity in %,
    UCUM), an Observation for the suggested label with the referable flag, one for image quality, one for the
    clinician's review, and an ImagingStudy for the source study when the upload was DICOM."""
    from fhir.resources.R4B.bundle import Bundle

    res: list[dict[str, Any]] = []
    ids = {k: _fhir_id(ctx, k) for k in ("patient", "device", "report", "label", "quality", "review", "study")}
    ref = {k: {"reference": f"urn:uuid:{v}"} for k, v in ids.items()}
    status = ctx.status
    site = _fhir_body_site(ctx.laterality)
    effective = ctx.visit_date.isoformat()
    note = [{"text": DISCLAIMER}]
    common = {"status": status, "subject": ref["patient"], "effectiveDateTime": effective,
              "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging", "display": "Imaging"}]}]}
    if site:
        common["bodySite"] = site
    model_obs = {**common, "device": ref["device"], "issued": _instant(ctx.created_at),
                 "method": {"text": _method_text(ctx)}}
    if ctx.dicom_refs:
        model_obs["derivedFrom"] = [ref["study"]]

    res.append({"resourceType": "Patient", "id": ids["patient"],
                "meta": {"security": [{"system": V3_OBSERVATION_VALUE, "code": "PSEUDED",
                                       "display": "pseudonymized"}]},
                "identifier": [{"system": CASE_REF_SYSTEM, "value": ctx.case_ref}]})
    res.append(_fhir_device(ctx, ids["device"]))
    results = []
    for i, (cls, p) in enumerate(ctx.probabilities.items()):
        oid = _fhir_id(ctx, f"probability-{i}")
        res.append({"resourceType": "Observation", "id": oid, **model_obs,
                    "code": {"coding": [{"system": PROBABILITY_SYSTEM, "code": _fhir_code(cls),
                                         "display": f"Probability of {cls}"}],
                             "text": f"Probability of {cls} ({ctx.model or 'model'})"},
                    "valueQuantity": {"value": round(100.0 * p, 2), "unit": "%", "system": UCUM, "code": "%"},
                    "note": note})
        results.append({"reference": f"urn:uuid:{oid}"})
    res.append(_fhir_label_observation(ctx, ids["label"], model_obs, note))
    results.append(ref["label"])
    if ctx.quality:
        res.append(_fhir_quality_observation(ctx, ids["quality"], model_obs))
        results.append(ref["quality"])
    if ctx.review is not None:
        res.append(_fhir_review_observation(ctx, ids["review"], common, ref["label"]))
        results.append(ref["review"])
    if ctx.dicom_refs:
        res.append(_fhir_imaging_study(ctx, ids["study"], ref["patient"]))
    report = {"resourceType": "DiagnosticReport", "id": ids["report"], "status": status,
              "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{result_uids(ctx).sr}"}],
              "category": [{"text": "Ophthalmic imaging: decision support"}],
              "code": {"coding": [{"system": DICOM_DCM, "code": "126000", "display": "Imaging Measurement Report"}],
                       "text": f"Retinal image analysis ({ctx.model or 'no model'}): decision support, "
                               "not a diagnosis"},
              "subject": ref["patient"], "effectiveDateTime": effective, "issued": _instant(ctx.issued),
              "result": results, "conclusion": _conclusion(ctx)}
    if ctx.review is not None and ctx.review.signed:
        report["resultsInterpreter"] = [{"display": ctx.review.reviewer}]
    if ctx.dicom_refs:
        report["imagingStudy"] = [ref["study"]]
    entries = [report] + res
    bundle = {"resourceType": "Bundle", "id": _fhir_id(ctx, "bundle"), "type": "collection",
              "timestamp": _instant(ctx.issued),
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in entries]}
    validated = Bundle.model_validate(bundle)          # raises pydantic.ValidationError on any invalid element
    return json.loads(validated.model_dump_json(exclude_none=True))


def fhir_json(ctx: ResultContext) -> str:
    """`fhir_bundle(ctx)` as indented JSON text."""
    return json.dumps(fhir_bundle(ctx), indent=2, ensure_ascii=False) + "\n"


def _instant(t: dt.datetime) -> str:
    return _utc(t).isoformat(timespec="seconds")


def _fhir_code(text: str) -> str:
    return " ".join(str(text).split()) or "-"


def _fhir_body_site(laterality: str) -> dict | None:
    if laterality not in EYE_SITES:
        return None
    code, display, text = EYE_SITES[laterality]
    return {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": text}


def _method_text(ctx: ResultContext) -> str:
    parts = [f"Deep-learning classifier {ctx.model or '(none)'}"]
    if ctx.weights_sha256:
        parts.append(f"weights sha256 {ctx.weights_sha256}")
    parts.append(f"heatmap: {ctx.method}" + (f" for {ctx.target}" if ctx.target else ""))
    if ctx.trained_on:
        parts.append(f"trained on: {ctx.trained_on}")
    return "; ".join(parts)


def _fhir_device(ctx: ResultContext, rid: str) -> dict:
    dev: dict[str, Any] = {"resourceType": "Device", "id": rid, "status": "active", "manufacturer": MANUFACTURER,
                           "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{result_uids(ctx).device}"}],
                           "type": {"text": "Software: retinal image classifier (decision support)"},
                           "note": [{"text": DISCLAIMER}]}
    if ctx.model:
        dev["deviceName"] = [{"name": ctx.model, "type": "model-name"}]
    if ctx.weights_sha256:
        dev["version"] = [{"type": {"text": "weights sha256"}, "value": ctx.weights_sha256}]
    if ctx.trained_on:
        dev["note"].append({"text": f"Trained on: {ctx.trained_on}"})
    return dev


def _fhir_label_observation(ctx: ResultContext, rid: str, base: dict, note: list) -> dict:
    obs = {"resourceType": "Observation", "id": rid, **base,
           "code": {"coding": [{"system": OBS_SYSTEM, "code": "suggested-label",
                                "display": "Suggested label (model output)"}],
                    "text": "Suggested label (model output, not a diagnosis)"},
           "component": [{"code": {"coding": [{"system": OBS_SYSTEM, "code": "suggestion",
                                               "display": "Suggested action"}]},
                          "valueString": ctx.suggestion}],
           "note": note}
    if ctx.label is not None:
        obs["valueCodeableConcept"] = {"coding": [{"system": CLASS_SYSTEM, "code": _fhir_code(ctx.label),
                                                   "display": ctx.label}], "text": ctx.label}
    else:
        obs["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": "not-performed",
                                               "display": "Not Performed"}], "text": ctx.suggestion}
    if ctx.referable is not None:
        obs["component"].append({"code": {"coding": [{"system": OBS_SYSTEM, "code": "referable",
                                                      "display": "Referable by this model"}]},
                                 "valueBoolean": bool(ctx.referable)})
    return obs


def _fhir_quality_observation(ctx: ResultContext, rid: str, base: dict) -> dict:
    q = ctx.quality
    comps = []
    if q.get("gradable") is not None:
        comps.append({"code": {"coding": [{"system": OBS_SYSTEM, "code": "gradable", "display": "Gradable"}]},
                      "valueBoolean": bool(q["gradable"])})
    if q.get("score") is not None:
        comps.append({"code": {"coding": [{"system": OBS_SYSTEM, "code": "quality-score",
                                           "display": "Quality score (0-1)"}]},
                      "valueQuantity": {"value": float(q["score"]), "unit": "1", "system": UCUM, "code": "1"}})
    obs = {"resourceType": "Observation", "id": rid, **{k: v for k, v in base.items() if k != "method"},
           "code": {"coding": [{"system": OBS_SYSTEM, "code": "image-quality", "display": "Image quality"}],
                    "text": "Image quality (gradability check)"},
           "valueString": str(q.get("verdict") or ("gradable" if q.get("gradable") else "not gradable"))}
    if comps:
        obs["component"] = comps
    if q.get("reasons"):
        obs["note"] = [{"text": "; ".join(str(r) for r in q["reasons"])}]
    return obs


def _fhir_review_observation(ctx: ResultContext, rid: str, base: dict, label_ref: dict) -> dict:
    r = ctx.review
    obs = {"resourceType": "Observation", "id": rid, **base,
           "status": "final" if r.signed else "preliminary",
           "code": {"coding": [{"system": OBS_SYSTEM, "code": "clinician-review",
                                "display": "Clinician's review of the suggestion"}],
                    "text": f"Clinician's review (version {r.version}, {'signed' if r.signed else 'not signed'})"},
           "valueCodeableConcept": {"coding": [{"system": DECISION_SYSTEM, "code": r.decision,
                                                "display": DECISION_TEXT[r.decision]}],
                                    "text": DECISION_TEXT[r.decision]},
           "performer": [{"display": r.reviewer}], "issued": _instant(r.signed_at or r.created_at),
           "derivedFrom": [label_ref]}
    if r.label:
        obs["component"] = [{"code": {"coding": [{"system": OBS_SYSTEM, "code": "reviewed-grade",
                                                  "display": "Grade given by the clinician"}]},
                             "valueCodeableConcept": {"coding": [{"system": CLASS_SYSTEM, "code": _fhir_code(r.label),
                                                                  "display": r.label}], "text": r.label}}]
    return obs


def _fhir_imaging_study(ctx: ResultContext, rid: str, patient_ref: dict) -> dict:
    refs = ctx.dicom_refs
    series: dict[str, Any] = {"uid": refs["series_uid"],
                              "modality": {"system": DICOM_DCM,
                                           "code": MODALITY_BY_SOP_CLASS.get(refs["sop_class_uid"], "OT")},
                              "instance": [{"uid": refs["sop_uid"],
                                            "sopClass": {"system": "urn:ietf:rfc:3986",
                                                         "code": f"urn:oid:{refs['sop_class_uid']}"}}]}
    if ctx.laterality in LATERALITY_CODES:
        code, display = LATERALITY_CODES[ctx.laterality]
        series["laterality"] = {"system": SNOMED, "code": code, "display": display}
    return {"resourceType": "ImagingStudy", "id": rid, "status": "available", "subject": patient_ref,
            "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{refs['study_uid']}"}], "series": [series]}


def _conclusion(ctx: ResultContext) -> str:
    if ctx.label is None:
        lines = [f"No result: {ctx.suggestion}"]
    else:
        p = ctx.probabilities.get(ctx.label)
        lines = [f"Suggested label: {ctx.label}" + (f" ({100 * p:.1f}%)" if p is not None else "") +
                 f". {ctx.suggestion}"]
    r = ctx.review
    if r is None:
        lines.append("Not reviewed by a clinician yet.")
    else:
        grade = f"; grade {r.label}" if r.label else ""
        when = (f"signed {_instant(r.signed_at)}" if r.signed else "not signed")
        lines.append(f"Clinician review v{r.version} by {r.reviewer} ({when}): {DECISION_TEXT[r.decision]}{grade}.")
    lines.append(DISCLAIMER)
    return " ".join(lines)


# ------------------------------------------------------------------------------------------------ DICOM
def _header(ctx: ResultContext, study_uid: str, series_uid: str, sop_class: str, sop_uid: str, **extra) -> Any:
    """The patient / study header every exported object gets (and the SR copies from its evidence): PatientID =
    the pseudonymous case reference, PatientName / birth date / sex / accession / physician empty (a deliberate
    privacy decision: the hospital reconciles by StudyInstanceUID)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = ctx.case_ref, "", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = ctx.visit_date.strftime("%Y%m%d"), "", "", ""
    ds.ReferringPhysicianName = ""
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def _scheme() -> list:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [CodingSchemeIdentificationItem(designator=SCHEME, name="retina_core model classes and result concepts",
                                           responsible_organization="retina_core project")]


def _class_code(cls: str) -> str:
    """A class name as a DICOM code value (SH, at most 16 characters; longer names become a stable hash)."""
    import hashlib

    text = re.sub(r"[^A-Za-z0-9_.-]", "_", str(cls))
    return text if 0 < len(text) <= 16 else "C" + hashlib.sha256(str(cls).encode()).hexdigest()[:15]


def _dicom_write(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _set_times(ds, when: dt.datetime) -> None:
    when = _utc(when)
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = "+0000"


def _heatmap_dataset(ctx: ResultContext, uids: ResultUIDs):
    """The heatmap over the image (JET colours, alpha 0.45: blue low, red high) as a Secondary Capture image."""
    if not ctx.has_heatmap:
        raise RetinaInputError(f"Analysis {ctx.analysis_id} has no heatmap (the image gave no result), so there is "
                               "no heatmap image to export; the FHIR report and the SR still describe it.")
    if ctx.pixels is None or ctx.heatmap is None:
        raise ValueError("the context was read without pixels: result_context(..., pixels=True)")
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from ..explain.overlay import overlay

    rgb = np.ascontiguousarray(overlay(np.asarray(ctx.pixels, dtype=np.uint8), ctx.heatmap))
    sc = hd.sc.SCImage(
        pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=uids.study, series_instance_uid=uids.heatmap_series,
        series_number=SERIES_NUMBERS["heatmap"], sop_instance_uid=uids.heatmap, instance_number=1,
        manufacturer=MANUFACTURER, patient_id=ctx.case_ref, patient_name="", patient_birth_date=None,
        patient_sex=None, accession_number=None, study_id=None, study_date=ctx.visit_date,
        referring_physician_name=None, patient_orientation=("L", "F"),
        laterality={"OD": "R", "OS": "L"}.get(ctx.laterality),
        series_description=f"Heatmap ({ctx.method}), decision support"[:64],
        manufacturer_model_name=(ctx.model or "none")[:64],
        software_versions=(ctx.weights_sha256 or "unknown")[:64], content_qualification="RESEARCH",
        specific_character_set="ISO_IR 192")
    # Orientation of a retinal photo or B-scan is not known here: Patient Orientation is type 2, so empty.
    sc.PatientOrientation = ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.StudyTime = ""
    sc.DerivationDescription = (f"Heatmap ({ctx.method}) of model {ctx.model} over the image it read "
                                f"(JET colours, blue low, red high). {DISCLAIMER}")[:1024]
    sc.ImageComments = DISCLAIMER
    _set_times(sc, ctx.created_at)
    if ctx.dicom_refs:
        src = Dataset()
        src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = (ctx.dicom_refs["sop_class_uid"],
                                                                   ctx.dicom_refs["sop_uid"])
        src.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(
            codes.DCM.SourceImageForImageProcessingOperation)]
        sc.SourceImageSequence = [src]
    return sc


def dicom_heatmap(ctx: ResultContext) -> bytes:
    """The heatmap over the image as a DICOM Secondary Capture image (Part-10 bytes, RGB, 8 bit), in the source
    study for a DICOM upload, else in the result study. No heatmap: RetinaInputError."""
    return _dicom_write(_heatmap_dataset(ctx, result_uids(ctx)))


def dicom_sr(ctx: ResultContext) -> bytes:
    """The findings as a DICOM Enhanced SR (TID 1500 Measurement Report), Part-10 bytes; see `dicom_pair`."""
    return dicom_pair(ctx, heatmap=False)[0]


def dicom_pair(ctx: ResultContext, heatmap: bool = True) -> tuple[bytes, bytes | None]:
    """(SR, heatmap image) with consistent UIDs: the SR's image library lists the heatmap image (when the analysis
    has one) and, for a DICOM upload, its measurement group cites the source image (both in the SR's evidence).
    heatmap=False, or an analysis without a heatmap: (SR, None), the SR without a heatmap reference."""
    uids = result_uids(ctx)
    hm = _heatmap_dataset(ctx, uids) if heatmap and ctx.has_heatmap else None
    return _dicom_write(_sr_dataset(ctx, uids, hm)), (_dicom_write(hm) if hm is not None else None)


def _sr_dataset(ctx: ResultContext, uids: ResultUIDs, hm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    refs = ctx.dicom_refs
    sr_uid = uids.sr if hm is not None else uids.sr_alone
    evidence = []
    if refs:
        evidence.append(_header(ctx, refs["study_uid"], refs["series_uid"], refs["sop_class_uid"], refs["sop_uid"]))
    hm_header = None
    if hm is not None:
        hm_header = _header(ctx, uids.study, uids.heatmap_series, SC_SOP_CLASS, uids.heatmap, Modality="OT",
                            Rows=hm.Rows, Columns=hm.Columns)
        evidence.append(hm_header)
    placeholder = not evidence
    if placeholder:     # highdicom copies patient / study from evidence[0]; nothing to cite: the SR's own header
        evidence.append(_header(ctx, uids.study, uids.sr_series, ENHANCED_SR_SOP_CLASS, sr_uid))

    site = [hd.sr.FindingSite(anatomic_location=codes.SCT.Eye,
                              laterality={"OD": codes.SCT.Right, "OS": codes.SCT.Left}.get(ctx.laterality))]
    algorithm = hd.sr.AlgorithmIdentification(
        name=ctx.model or "none", version=ctx.weights_sha256 or "unknown",
        parameters=[f"heatmap method: {ctx.method}"] + ([f"trained on: {ctx.trained_on}"] if ctx.trained_on else []))
    measurements = [hd.sr.Measurement(name=_code(_class_code(cls), f"Probability of {cls}"),
                                      value=round(100.0 * p, 2), unit=codes.UCUM.Percent)
                    for cls, p in ctx.probabilities.items()]
    evaluations = []
    if ctx.referable is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(_code("REFERABLE", "Referable by this model"),
                                                       codes.SCT.Yes if ctx.referable else codes.SCT.No))
    q = ctx.quality
    if q.get("gradable") is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            codes.DCM.ImageQuality, _code("GRADABLE", "Gradable") if q["gradable"] else
            _code("UNGRADABLE", "Not gradable")))
    source = ([hd.sr.SourceImageForMeasurementGroup(refs["sop_class_uid"], refs["sop_uid"])] if refs else None)
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_dicom_uid(*_seed(ctx), "tracking"),
                                                     identifier=f"analysis {ctx.analysis_id}"),
        finding_type=_code(_class_code(ctx.label), ctx.label) if ctx.label is not None else None,
        finding_sites=site, algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations or None, source_images=source)]
    _append_text(groups[0], codes.DCM.Recommendation, ctx.suggestion)
    _append_text(groups[0], codes.DCM.Comment, DISCLAIMER)
    r = ctx.review
    if r is not None:
        review_evals = [hd.sr.QualitativeEvaluation(_code("REVIEW", "Clinician's review decision"),
                                                    _code(r.decision.upper(), DECISION_TEXT[r.decision]))]
        if r.label:
            review_evals.append(hd.sr.QualitativeEvaluation(_code("REVIEWGRADE", "Grade given by the clinician"),
                                                            _code(_class_code(r.label), r.label)))
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_dicom_uid(*_seed(ctx), "review", _review_state(ctx)),
                                                         identifier=f"analysis {ctx.analysis_id} review v{r.version}"),
            finding_sites=site, qualitative_evaluations=review_evals)
        when = f"signed {_instant(r.signed_at)}" if r.signed else "not signed"
        _append_text(group, codes.DCM.Comment, f"Review version {r.version} by {r.reviewer} ({when}).")
        groups.append(group)

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device, name=(ctx.model or "none")[:64], manufacturer_name=MANUFACTURER,
            model_name=(ctx.model or "none")[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups,
        referenced_images=[hm_header] if hm_header is not None else None)
    signed = r is not None and r.signed
    sr = hd.sr.EnhancedSR(
        evidence=evidence, content=report, series_instance_uid=uids.sr_series,
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=sr_uid, instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=signed, is_verified=signed,
        verifying_observer_name=_person_name(r.reviewer) if signed else None,
        verifying_organization="not recorded" if signed else None,
        series_description=f"Findings ({ctx.model or 'no model'}), decision support"[:64],
        content_qualification="RESEARCH", coding_schemes=_scheme(), specific_character_set="ISO_IR 192")
    if placeholder:
        del sr.CurrentRequestedProcedureEvidenceSequence
    if signed:
        from pydicom.valuerep import DT

        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(_utc(r.signed_at))
    _set_times(sr, ctx.issued)
    return sr


def _append_text(group, name, value: str) -> None:
    """A TEXT item (TID 1501 allows text qualitative evaluations) in a measurement group's container."""
    from highdicom.sr import TextContentItem

    if value:
        group[0].ContentSequence.append(TextContentItem(name=name, value=value[:1024], relationship_type="CONTAINS"))


def _person_name(text: str) -> str:
    """A reviewer's free-text name or staff code as a DICOM PN: the whole text as the family-name component
    (separators dropped; the trailing caret says it is one component on purpose)."""
    return (" ".join(re.sub(r"[\\^=]", " ", text).split())[:63] or "unknown") + "^"


# ------------------------------------------------------------------------------------------------ files
def export_results(clinic: Clinic, analysis_id: int, out_dir: str | Path, formats: tuple[str, ...] | None = None,
                   *, actor: str) -> list[Path]:
    """Write one analysis' results to `out_dir` as analysis-<id>.fhir.json, analysis-<id>.sr.dcm and
    analysis-<id>.heatmap.dcm (file names hold the analysis id only, never a case reference or original name),
    and record an `export_results` audit event. formats: any of FORMATS; None: all that apply (the heatmap image
    only when the analysis has a heatmap). Asking for "heatmap" of an analysis without one: RetinaInputError."""
    actor = clean_name(actor, "Exported by")
    wanted = tuple(formats) if formats is not None else None
    bad = [f for f in (wanted or ()) if f not in FORMATS]
    if bad or wanted == ():
        raise RetinaInputError(f"Formats {', '.join(bad) or '(none)'}: choose from {', '.join(FORMATS)}.")
    ctx = result_context(clinic, analysis_id, pixels=wanted is None or "heatmap" in wanted)
    if wanted is None:
        wanted = FORMATS if ctx.has_heatmap else ("fhir", "sr")
    out: dict[str, bytes] = {}
    if "fhir" in wanted:
        out["fhir"] = fhir_json(ctx).encode("utf-8")
    if "heatmap" in wanted and not ctx.has_heatmap:
        dicom_heatmap(ctx)                      # raises the clear message
    if "sr" in wanted or "heatmap" in wanted:
        sr, hm = dicom_pair(ctx, heatmap="heatmap" in wanted)
        if "sr" in wanted:
            out["sr"] = sr
        if hm is not None:
            out["heatmap"] = hm
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        if fmt in out:
            path = folder / f"analysis-{ctx.analysis_id}.{SUFFIXES[fmt]}"
            path.write_bytes(out[fmt])
            paths.append(path)
    with clinic.writing() as s:
        audit(s, actor, "export_results", "analysis", ctx.analysis_id, formats=[f for f in FORMATS if f in out])
    return paths
