"""What the pages and the CLI do with the clinic: save readings, list the worklist, view a case, review.

    saved = save_reading(clinic, case_ref="SCR-0042", eye="OD", visit_date=date(2026, 5, 1), image=img,
                         analyses=rc.analyze_all(img), actor="dr-k")
    rows = worklist(clinic, awaiting_only=True)                 # referable cases first
    view = case_view(clinic, saved.case_id)                     # eyes -> visits -> images -> analyses -> reviews
    save_review(clinic, saved.analysis_ids[0], "corrected", corrected_label="DME", reviewer="dr-k", sign=True)

Every write is one transaction that also appends to the audit trail (ids, hashes, labels; never identifiers, never
the free-text comment). Writes that race on a unique key (two sessions creating one case, or saving version n + 1 of
one review) are retried with fresh data, so concurrent work is never lost: two reviewers of one analysis end up as
two versions, and the later one is told it was based on an older version (`ReviewSaved.conflict`).
Views are plain frozen dataclasses, safe to use after the session closed.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ..errors import RetinaInputError
from .db import Clinic
from .privacy import validate_case_ref
from .schema import (DECISIONS, AnalysisRecord, AuditEvent, Case, Eye, Image, Review, Visit, VisitImage, utcnow)

T = TypeVar("T")
EYE_CODES = {"OD": "OD", "OS": "OS", "U": "U", None: "U"}
EYE_NAMES = {"OD": "Right eye (OD)", "OS": "Left eye (OS)", "U": "Eye not recorded"}
MAX_COMMENT = 4000
RETRIES = 6


# ------------------------------------------------------------------------------------------------ helpers
def clean_name(text: str | None, what: str = "Reviewer") -> str:
    """A reviewer's or saver's name or staff code: stripped, one line, 1-128 characters (accounts come later)."""
    name = " ".join(str(text or "").split())
    if not name:
        raise RetinaInputError(f"{what}: type your name or staff code.")
    if len(name) > 128:
        raise RetinaInputError(f"{what}: at most 128 characters.")
    return name


def audit(s: Session, actor, action: str, object_type: str, object_id: int | None, **details) -> None:
    """Append one audit event in the current transaction (details: ids, hashes, labels, counts).
    actor: an `accounts.UserView` (its user name and account id are recorded) or a name (command line, tests)."""
    name = getattr(actor, "username", actor)
    s.add(AuditEvent(actor=str(name), action=action, object_type=object_type, object_id=object_id,
                     user_id=getattr(actor, "id", None), details=json.loads(json.dumps(details, default=str))))


def _in_transaction(clinic: Clinic, work: Callable[[Session], T]) -> T:
    """Run `work` in one write transaction; a unique-key race (IntegrityError) reruns it with fresh data."""
    for attempt in range(RETRIES):
        try:
            with clinic.writing() as s:
                return work(s)
        except IntegrityError:
            if attempt == RETRIES - 1:
                raise
            time.sleep(random.uniform(0.005, 0.03) * (attempt + 1))
    raise AssertionError("unreachable")


def _touch(s: Session, case_id: int) -> None:
    case = s.get(Case, case_id)
    if case is not None:
        case.last_activity_at = utcnow()


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=float, allow_nan=False))


# ------------------------------------------------------------------------------------------------ saving readings
@dataclass(frozen=True)
class SavedReading:
    case_id: int
    case_ref: str
    visit_id: int
    image_id: int
    analysis_ids: tuple[int, ...]
    new_analyses: int                   # 0: this image was already saved with these models and methods
    linked_refs: tuple[str, ...]        # other cases of the same DICOM patient (same keyed PatientID hash)


def save_reading(clinic: Clinic, *, case_ref: str | None, eye: str | None, visit_date: dt.date, image,
                 analyses: Sequence, actor: str | None = None, patient_key: str | None = None, user=None,
                 dicom_refs: dict | None = None) -> SavedReading:
    """Store one image's analyses (`retina_core.analysis.Analysis`, all of one image) under a case, eye and visit.

    image: the `RetinalImage` they were computed from (its pixels go to the content store as a metadata-free PNG).
    case_ref: the pseudonymous reference (validated); None with a `patient_key` adds to that patient's latest case.
    patient_key: `privacy.dicom_patient_key(...)` of a DICOM upload, or None. A case already holding another
    patient's key refuses the image (a mixed-up reference). Saving the same image, models and methods at the same
    visit again adds nothing.
    user: the signed-in account (`accounts.UserView`, needs the clinician role); its name replaces `actor`.
    dicom_refs: the source DICOM's UIDs (`interop.dicom_refs_from_bytes`), kept to file results back to its study."""
    if user is not None:
        user.require("save", "Saving readings")
        actor = user.label
    ref = validate_case_ref(case_ref) if case_ref and case_ref.strip() else None
    if ref is None and not patient_key:
        validate_case_ref(case_ref)          # raises the "type a case reference" message
    actor = clean_name(actor or "anonymous (no accounts yet)", "Saved by")
    laterality = EYE_CODES.get(eye)
    if laterality is None:
        raise RetinaInputError(f"Eye {eye!r}: choose OD, OS or not recorded.")
    if getattr(image, "kind", "image") != "image":
        raise RetinaInputError("An OCT volume is saved as its reading's en-face picture (`volume.volume_reading`), "
                               "not as the volume itself.")
    if not analyses:
        raise RetinaInputError("Nothing to save: the image has no analysis.")
    if any(a.content_hash != image.content_hash for a in analyses):
        raise ValueError("every analysis must be of `image`")
    if isinstance(visit_date, dt.datetime):
        visit_date = visit_date.date()
    # Content first (idempotent, outside the transaction): image pixels and each heatmap, named by their hashes.
    stored_hash = clinic.store.put_image(image.pixels)
    heatmaps = [clinic.store.put_heatmap(a.heatmap) if a.heatmap is not None else None for a in analyses]
    outputs = [_jsonable(a.to_dict()) for a in analyses]

    def work(s: Session) -> SavedReading:
        case = s.scalar(select(Case).where(Case.ref == ref)) if ref else s.scalar(
            select(Case).where(Case.patient_key == patient_key).order_by(Case.last_activity_at.desc(), Case.id.desc())
            .limit(1))
        if case is None and ref is None:
            raise RetinaInputError("No case holds this patient's studies yet: type a case reference.")
        if case is None:
            case = Case(ref=ref, patient_key=patient_key)
            s.add(case)
            s.flush()
            audit(s, user or actor, "case.create", "case", case.id, linked=bool(patient_key))
        elif patient_key and case.patient_key and case.patient_key != patient_key:
            raise RetinaInputError(f"Case {case.ref} holds another patient's DICOM studies (the PatientID differs). "
                                   "Check the case reference before saving.")
        elif patient_key and case.patient_key is None:
            case.patient_key = patient_key
        eye_row = s.scalar(select(Eye).where(Eye.case_id == case.id, Eye.laterality == laterality))
        if eye_row is None:
            eye_row = Eye(case_id=case.id, laterality=laterality)
            s.add(eye_row)
            s.flush()
        visit = s.scalar(select(Visit).where(Visit.eye_id == eye_row.id, Visit.visit_date == visit_date))
        if visit is None:
            visit = Visit(eye_id=eye_row.id, visit_date=visit_date)
            s.add(visit)
            s.flush()
        img_row = s.scalar(select(Image).where(Image.content_hash == image.content_hash))
        if img_row is None:
            img_row = Image(content_hash=image.content_hash, stored_hash=stored_hash,
                            source_format=image.source_format, modality=analyses[0].modality,
                            width=image.width, height=image.height, dicom_refs=dicom_refs or None)
            s.add(img_row)
            s.flush()
        if s.get(VisitImage, (visit.id, img_row.id)) is None:
            s.add(VisitImage(visit_id=visit.id, image_id=img_row.id))
        have = {(r.model, r.method): r.id for r in s.scalars(
            select(AnalysisRecord).where(AnalysisRecord.visit_id == visit.id, AnalysisRecord.image_id == img_row.id))}
        ids, new = [], 0
        for a, hm, out in zip(analyses, heatmaps, outputs):
            if (a.model, a.method) in have:
                ids.append(have[(a.model, a.method)])
                continue
            rec = AnalysisRecord(visit_id=visit.id, image_id=img_row.id, model=a.model,
                                 weights_sha256=a.weights_sha256, method=a.method, target=a.target, label=a.label,
                                 referable=a.referable, suggestion=a.suggestion, modality=a.modality,
                                 trained_on=a.trained_on, outputs=out, heatmap_hash=hm, created_by=actor,
                                 created_by_id=getattr(user, "id", None))
            s.add(rec)
            s.flush()
            have[(a.model, a.method)] = rec.id
            ids.append(rec.id)
            new += 1
        case.last_activity_at = utcnow()
        audit(s, user or actor, "reading.save", "visit", visit.id, case_id=case.id, image_id=img_row.id,
              content_hash=image.content_hash, analyses=ids, new=new, models=[a.model for a in analyses])
        linked = ()
        if case.patient_key:
            linked = tuple(s.scalars(select(Case.ref).where(Case.patient_key == case.patient_key,
                                                            Case.id != case.id).order_by(Case.id)))
        return SavedReading(case.id, case.ref, visit.id, img_row.id, tuple(ids), new, linked)

    return _in_transaction(clinic, work)


# ------------------------------------------------------------------------------------------------ reviews
@dataclass(frozen=True)
class ReviewSaved:
    review_id: int
    version: int
    signed: bool
    conflict: bool          # someone saved a version after the one this review was based on


def save_review(clinic: Clinic, analysis_id: int, decision: str, *, reviewer: str | None = None,
                corrected_label: str | None = None, comment: str = "", sign: bool = False,
                based_on_version: int | None = None, user=None) -> ReviewSaved:
    """Add the next version of the review of one analysis (never changes an earlier version).

    decision: "agree" | "disagree" | "corrected" (then `corrected_label`, one of the model's classes).
    sign: signed versions are immutable. based_on_version: the latest version the reviewer saw (None: none).
    user: the signed-in account (`accounts.UserView`): reviewing needs the clinician role, and so does signing;
    its name replaces `reviewer` and the review records the account."""
    if user is not None:
        user.require("sign" if sign else "review", "Signing a review" if sign else "Reviewing")
        reviewer = user.label
    if decision not in DECISIONS:
        raise RetinaInputError(f"Decision {decision!r}: choose agree, disagree or corrected.")
    reviewer = clean_name(reviewer)
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise RetinaInputError(f"The comment is {len(comment)} characters; at most {MAX_COMMENT}.")
    corrected_label = (corrected_label or None) if decision == "corrected" else None
    if decision == "corrected" and not corrected_label:
        raise RetinaInputError("A corrected grade needs the grade: choose one of the model's classes.")

    def work(s: Session) -> ReviewSaved:
        a = s.get(AnalysisRecord, analysis_id)
        if a is None:
            raise RetinaInputError(f"There is no stored analysis {analysis_id}.")
        classes = list((a.outputs or {}).get("probabilities") or {})
        if corrected_label is not None and corrected_label not in classes:
            raise RetinaInputError(f"{corrected_label!r} is not one of {a.model}'s classes "
                                   f"({', '.join(classes) or 'none: this image has no result'}).")
        latest = s.scalar(select(func.max(Review.version)).where(Review.analysis_id == a.id)) or 0
        now = utcnow()
        r = Review(analysis_id=a.id, version=latest + 1, based_on_version=based_on_version, decision=decision,
                   corrected_label=corrected_label, comment=comment, reviewer=reviewer, created_at=now,
                   signed_at=now if sign else None, reviewer_id=getattr(user, "id", None))
        s.add(r)
        s.flush()
        audit(s, user or reviewer, "review.sign" if sign else "review.save", "review", r.id, analysis_id=a.id,
              version=r.version, decision=decision, corrected_label=corrected_label)
        _touch(s, s.scalar(select(Eye.case_id).join(Visit).where(Visit.id == a.visit_id)))
        return ReviewSaved(r.id, r.version, sign, conflict=latest != (based_on_version or 0))

    return _in_transaction(clinic, work)


# ------------------------------------------------------------------------------------------------ views
@dataclass(frozen=True)
class ReviewView:
    id: int
    version: int
    based_on_version: int | None
    decision: str
    corrected_label: str | None
    comment: str
    reviewer: str
    created_at: dt.datetime
    signed_at: dt.datetime | None
    label: str | None                   # the label this review gives the image (None for a plain disagree)


@dataclass(frozen=True)
class AnalysisView:
    id: int
    image_id: int
    model: str | None
    weights_sha256: str | None
    method: str
    target: str | None
    label: str | None
    probabilities: dict[str, float]
    referable: bool | None
    suggestion: str
    trained_on: str | None
    modality: str | None
    heatmap_hash: str | None
    quality: dict
    notes: tuple[str, ...]
    created_at: dt.datetime
    created_by: str
    reviews: tuple[ReviewView, ...]     # oldest version first

    @property
    def latest_review(self) -> ReviewView | None:
        return self.reviews[-1] if self.reviews else None

    @property
    def signed_review(self) -> ReviewView | None:
        """The newest signed version (what counts), or None."""
        return next((r for r in reversed(self.reviews) if r.signed_at is not None), None)


@dataclass(frozen=True)
class ImageView:
    id: int
    content_hash: str
    stored_hash: str
    source_format: str
    modality: str | None
    width: int
    height: int
    analyses: tuple[AnalysisView, ...]


@dataclass(frozen=True)
class VisitView:
    id: int
    visit_date: dt.date
    images: tuple[ImageView, ...]


@dataclass(frozen=True)
class Change:
    """One model's reading of an eye at its previous visit and at its latest (probabilities averaged over the
    visit's images the model read)."""
    model: str
    before_date: dt.date
    after_date: dt.date
    before_label: str
    after_label: str
    before_p: float                     # P(after_label) at the previous visit
    after_p: float                      # P(after_label) at the latest visit
    referable_before: bool
    referable_after: bool

    @property
    def text(self) -> str:
        days = (self.after_date - self.before_date).days
        what = (f"still {self.after_label}" if self.before_label == self.after_label
                else f"{self.before_label} -> {self.after_label}")
        ref = ("now referable" if self.referable_after and not self.referable_before else
               "no longer referable" if self.referable_before and not self.referable_after else
               "referable" if self.referable_after else "not referable")
        return (f"{self.model}: {what}; P({self.after_label}) {self.before_p:.0%} -> {self.after_p:.0%} "
                f"({(self.after_p - self.before_p) * 100:+.0f} points) over {days} days; {ref}")


@dataclass(frozen=True)
class EyeView:
    laterality: str
    visits: tuple[VisitView, ...]       # oldest first
    changes: tuple[Change, ...]         # latest visit vs the one before (empty with one visit)

    @property
    def name(self) -> str:
        return EYE_NAMES[self.laterality]


@dataclass(frozen=True)
class CaseView:
    id: int
    ref: str
    created_at: dt.datetime
    last_activity_at: dt.datetime | None
    eyes: tuple[EyeView, ...]
    linked_refs: tuple[str, ...] = field(default=())

    def analyses(self) -> list[AnalysisView]:
        return [a for e in self.eyes for v in e.visits for i in v.images for a in i.analyses]


def _review_view(r: Review, a: AnalysisRecord) -> ReviewView:
    label = r.corrected_label if r.decision == "corrected" else (a.label if r.decision == "agree" else None)
    return ReviewView(r.id, r.version, r.based_on_version, r.decision, r.corrected_label, r.comment, r.reviewer,
                      r.created_at, r.signed_at, label)


def _analysis_view(a: AnalysisRecord) -> AnalysisView:
    out = a.outputs or {}
    return AnalysisView(a.id, a.image_id, a.model, a.weights_sha256, a.method, a.target, a.label,
                        {k: float(v) for k, v in (out.get("probabilities") or {}).items()}, a.referable, a.suggestion,
                        a.trained_on, a.modality, a.heatmap_hash, dict(out.get("quality") or {}),
                        tuple(out.get("notes") or ()), a.created_at, a.created_by,
                        tuple(_review_view(r, a) for r in a.reviews))


def _visit_view(v: Visit) -> VisitView:
    by_image: dict[int, list[AnalysisView]] = {}
    for a in v.analyses:
        by_image.setdefault(a.image_id, []).append(_analysis_view(a))
    return VisitView(v.id, v.visit_date, tuple(
        ImageView(i.id, i.content_hash, i.stored_hash, i.source_format, i.modality, i.width, i.height,
                  tuple(by_image.get(i.id, ()))) for i in v.images))


def _reading_by_model(visit: VisitView) -> dict[str, tuple[dict[str, float], bool]]:
    """model -> (mean probabilities over the visit's images it read, any referable)."""
    acc: dict[str, list[AnalysisView]] = {}
    for img in visit.images:
        for a in img.analyses:
            if a.model and a.label is not None:
                acc.setdefault(a.model, []).append(a)
    out = {}
    for model, items in acc.items():
        classes = list(items[0].probabilities)
        mean = np.mean([[a.probabilities.get(c, 0.0) for c in classes] for a in items], axis=0)
        out[model] = ({c: float(p) for c, p in zip(classes, mean)}, any(bool(a.referable) for a in items))
    return out


def changes_since_last_visit(visits: Sequence[VisitView]) -> tuple[Change, ...]:
    """Per model read at both, the eye's latest visit against the one before it."""
    if len(visits) < 2:
        return ()
    before, after = visits[-2], visits[-1]
    b, a = _reading_by_model(before), _reading_by_model(after)
    found = []
    for model in [m for m in a if m in b]:
        (pa, ra), (pb, rb) = a[model], b[model]
        la, lb = max(pa, key=pa.get), max(pb, key=pb.get)
        found.append(Change(model, before.visit_date, after.visit_date, lb, la, pb.get(la, 0.0), pa[la], rb, ra))
    return tuple(found)


def _case_query():
    return select(Case).options(
        selectinload(Case.eyes).selectinload(Eye.visits).selectinload(Visit.analyses)
        .selectinload(AnalysisRecord.reviews),
        selectinload(Case.eyes).selectinload(Eye.visits).selectinload(Visit.images))


def case_view(clinic: Clinic, case_id: int) -> CaseView:
    with clinic.session() as s:
        case = s.scalar(_case_query().where(Case.id == case_id))
        if case is None:
            raise RetinaInputError(f"There is no case {case_id}.")
        eyes = []
        for e in case.eyes:
            visits = tuple(_visit_view(v) for v in e.visits)
            eyes.append(EyeView(e.laterality, visits, changes_since_last_visit(visits)))
        linked = ()
        if case.patient_key:
            linked = tuple(s.scalars(select(Case.ref).where(Case.patient_key == case.patient_key,
                                                            Case.id != case.id).order_by(Case.id)))
        return CaseView(case.id, case.ref, case.created_at, case.last_activity_at, tuple(eyes), linked)


HIDDEN_COMMENT = "(comment hidden in the de-identified view)"


def deidentified(view: CaseView) -> CaseView:
    """The case as a researcher sees it: no pseudonymous reference (a case number instead), no links to the same
    patient's other cases, and no free-text comments (they could hold anything a clinician typed)."""
    def eye(e: EyeView) -> EyeView:
        return replace(e, visits=tuple(replace(v, images=tuple(replace(i, analyses=tuple(
            replace(a, reviews=tuple(replace(r, comment=HIDDEN_COMMENT if r.comment else "") for r in a.reviews))
            for a in i.analyses)) for i in v.images)) for v in e.visits))

    return replace(view, ref=case_number(view.id), linked_refs=(), eyes=tuple(eye(e) for e in view.eyes))


def case_number(case_id: int) -> str:
    return f"Case #{case_id}"


def find_case(clinic: Clinic, ref: str) -> int | None:
    with clinic.session() as s:
        return s.scalar(select(Case.id).where(Case.ref == ref.strip()))


# ------------------------------------------------------------------------------------------------ worklist
@dataclass(frozen=True)
class WorklistRow:
    case_id: int
    ref: str
    eyes: tuple[str, ...]
    last_visit: dt.date | None
    visits: int
    images: int
    referable: bool                     # a suggestion at an eye's latest visit says refer
    awaiting: int                       # analyses with no signed review
    analyses: int
    reviewers: tuple[str, ...]          # who signed reviews of this case
    last_activity_at: dt.datetime | None
    linked_cases: int                   # other cases of the same DICOM patient
    low_confidence: int = 0             # readings at an eye's latest visit below their model's confident level

    @property
    def status(self) -> str:
        if not self.analyses:
            return "no readings"
        return f"awaiting review ({self.awaiting} of {self.analyses})" if self.awaiting else "reviewed"


def worklist(clinic: Clinic, *, awaiting_only: bool = False, referable_first: bool = True,
             date_from: dt.date | None = None, date_to: dt.date | None = None, reviewer: str | None = None,
             limit: int = 500, deidentified: bool = False) -> list[WorklistRow]:
    """Cases, newest visit first; `referable_first` puts cases with a referable suggestion at the top.
    date_from / date_to: keep cases with a visit in that range (inclusive). reviewer: cases they signed.
    deidentified: case numbers instead of references, no same-patient counts (the researcher's view)."""
    with clinic.session() as s:
        cases = list(s.scalars(_case_query()))
        keys = Counter(c.patient_key for c in cases if c.patient_key)
    rows = []
    for c in cases:
        dates = [v.visit_date for e in c.eyes for v in e.visits]
        if (date_from or date_to) and not any((not date_from or d >= date_from) and (not date_to or d <= date_to)
                                              for d in dates):
            continue
        analyses = [a for e in c.eyes for v in e.visits for a in v.analyses]
        signed = [[r for r in a.reviews if r.signed_at is not None] for a in analyses]
        signers = tuple(sorted({r.reviewer for rs in signed for r in rs}))
        if reviewer and reviewer.strip().casefold() not in {x.casefold() for x in signers}:
            continue
        awaiting = sum(1 for rs in signed if not rs)
        if awaiting_only and not awaiting:
            continue
        referable = any(bool(a.referable) for e in c.eyes if e.visits for a in e.visits[-1].analyses)
        unsure = sum((a.outputs or {}).get("confident") is False for e in c.eyes if e.visits
                     for a in e.visits[-1].analyses)
        rows.append(WorklistRow(c.id, case_number(c.id) if deidentified else c.ref, tuple(e.laterality for e in c.eyes),
                                max(dates, default=None), len(dates),
                                len({i.id for e in c.eyes for v in e.visits for i in v.images}),
                                referable, awaiting, len(analyses), signers, c.last_activity_at,
                                keys[c.patient_key] - 1 if c.patient_key and not deidentified else 0, unsure))
    newest = dt.date.min
    rows.sort(key=lambda r: (r.last_visit or newest, _ts(r.last_activity_at)), reverse=True)
    if referable_first:
        rows.sort(key=lambda r: not r.referable)          # stable: newest first within each group
    return rows[:limit]


def _ts(t: dt.datetime | None) -> float:
    if t is None:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def reviewers(clinic: Clinic) -> list[str]:
    """Everyone who signed a review (for the worklist's filter)."""
    with clinic.session() as s:
        return sorted(set(s.scalars(select(Review.reviewer).where(Review.signed_at.is_not(None)))), key=str.casefold)


def audit_trail(clinic: Clinic, limit: int = 200, actor: str | None = None, action: str | None = None) -> list[dict]:
    """The newest audit events as dicts (at, actor, user_id, action, object_type, object_id, details); `actor`
    (exact) and `action` (a prefix: 'login' matches login, login.fail, login.lock ...) filter."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if action:
        q = q.where(AuditEvent.action.startswith(action, autoescape=True))
    with clinic.session() as s:
        return [{"at": e.at, "actor": e.actor, "user_id": e.user_id, "action": e.action,
                 "object_type": e.object_type, "object_id": e.object_id, "details": e.details}
                for e in s.scalars(q)]
