"""The clinic's tables as a typed SQLAlchemy 2 ORM (the migrations in migrations/versions create exactly these).

    case (pseudonymous ref, optional keyed hash of a DICOM PatientID)
      -> eye (OD | OS | U)  -> visit (date)  -> visit_images -> image (content hash; pixels in the content store)
                                             -> analysis (AnalysisRecord: one model's reading of one image)
                                                  -> review (versioned; a signed version is immutable)
    audit_event (who, what, when, object ids; never identifiers)
    user (local account: roles, argon2id hash, lock-out state; or a single-sign-on subject) -> user_session

No table holds a patient's name, birth date, hospital number or DICOM identifier. `reviewer`, `created_by` and
`actor` keep the name shown at the time; `reviewer_id`, `created_by_id` and `user_id` name the account (None for
rows written before accounts existed, or by the command line). `Image.dicom_refs` keeps only the source DICOM's
study / series / instance UIDs, so results can be filed back to that study (see docs/result_formats.md).
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (JSON, Boolean, CheckConstraint, Date, DateTime, ForeignKey, Integer, MetaData, String, Text,
                        TypeDecorator, UniqueConstraint, event)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

NAMING = {"ix": "ix_%(table_name)s_%(column_0_name)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s",
          "pk": "pk_%(table_name)s"}
LATERALITIES = ("OD", "OS", "U")             # right, left, not recorded
DECISIONS = ("agree", "disagree", "corrected")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC and read back timezone-aware (SQLite keeps no zone; PostgreSQL timestamptz)."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Case(Base):
    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)                 # pseudonym typed by the clinician
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)   # HMAC-SHA256 of a DICOM PatientID
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_activity_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=utcnow)

    eyes: Mapped[list[Eye]] = relationship(back_populates="case", order_by="Eye.laterality")


class Eye(Base):
    __tablename__ = "eyes"
    __table_args__ = (UniqueConstraint("case_id", "laterality", name="uq_eyes_case_id_laterality"),
                      CheckConstraint("laterality IN ('OD', 'OS', 'U')", name="laterality"))

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    laterality: Mapped[str] = mapped_column(String(2))

    case: Mapped[Case] = relationship(back_populates="eyes")
    visits: Mapped[list[Visit]] = relationship(back_populates="eye", order_by="Visit.visit_date")


class Visit(Base):
    __tablename__ = "visits"
    __table_args__ = (UniqueConstraint("eye_id", "visit_date", name="uq_visits_eye_id_visit_date"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    eye_id: Mapped[int] = mapped_column(ForeignKey("eyes.id", ondelete="CASCADE"), index=True)
    visit_date: Mapped[dt.date] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    eye: Mapped[Eye] = relationship(back_populates="visits")
    images: Mapped[list[Image]] = relationship(secondary="visit_images", order_by="Image.id")
    analyses: Mapped[list[AnalysisRecord]] = relationship(back_populates="visit", order_by="AnalysisRecord.id")


class Image(Base):
    """One uploaded image: `content_hash` = sha256 of the uploaded bytes (the app's identity for it, as in
    `RetinalImage.content_hash`); `stored_hash` = sha256 of the metadata-free PNG kept in the content store."""
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    stored_hash: Mapped[str] = mapped_column(String(64))
    source_format: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    dicom_refs: Mapped[dict[str, str] | None] = mapped_column(JSON)   # study/series/sop uids, sop class uid


class VisitImage(Base):
    __tablename__ = "visit_images"

    visit_id: Mapped[int] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AnalysisRecord(Base):
    """One model's stored reading of one image at one visit (`retina_core.analysis.Analysis` minus the pixels):
    `outputs` is `Analysis.to_dict()` (probabilities, quality, notes, ...); the heatmap is in the content store."""
    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(primary_key=True)
    visit_id: Mapped[int] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model: Mapped[str | None] = mapped_column(String(64))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(64))
    referable: Mapped[bool | None] = mapped_column(Boolean)
    suggestion: Mapped[str] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(String(16))
    trained_on: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    heatmap_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))

    visit: Mapped[Visit] = relationship(back_populates="analyses")
    image: Mapped[Image] = relationship()
    reviews: Mapped[list[Review]] = relationship(back_populates="analysis", order_by="Review.version")


class Review(Base):
    """One version of a clinician's review of one analysis. Rows are only ever added: a change is version n + 1
    (`based_on_version`: the version the reviewer saw). A signed version (`signed_at` set) can be neither updated
    nor deleted (checked here and by a database trigger)."""
    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("analysis_id", "version", name="uq_reviews_analysis_id_version"),
                      CheckConstraint("decision IN ('agree', 'disagree', 'corrected')", name="decision"),
                      CheckConstraint("decision <> 'corrected' OR corrected_label IS NOT NULL",
                                      name="corrected_label"))

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    based_on_version: Mapped[int | None] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(16))
    corrected_label: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    reviewer: Mapped[str] = mapped_column(String(128))
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    signed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    analysis: Mapped[AnalysisRecord] = relationship(back_populates="reviews")

    @property
    def label(self) -> str | None:
        """The label this review gives the image: the corrected grade, the model's label when agreeing, else None."""
        if self.decision == "corrected":
            return self.corrected_label
        return self.analysis.label if self.decision == "agree" else None


class AuditEvent(Base):
    """Append-only (a database trigger refuses updates and deletes). `details`: ids, hashes, labels, counts."""
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)   # no foreign key: the trail outlives accounts


class User(Base):
    """An account. `roles`: comma-separated subset of clinician, researcher, admin. `password_hash`: argon2id
    (None for single-sign-on accounts, which sign in through the identity provider only). `failed_logins` and
    `locked_until`: the lock-out after repeated failures. Accounts are disabled, never deleted (the audit trail and
    the signed reviews name them)."""
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    roles: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    oidc_subject: Mapped[str | None] = mapped_column(String(255), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    password_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class UserSession(Base):
    """A signed-in browser session: only the sha256 of its random token is stored. It ends at `expires_at`
    (absolute), after the idle limit since `last_seen_at`, or when `ended_at` is set (sign-out, account disabled)."""
    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    method: Mapped[str] = mapped_column(String(16), default="password")     # password | oidc

    user: Mapped[User] = relationship()


class ImmutableRecordError(RuntimeError):
    """An attempt to change a signed review or an audit event."""


@event.listens_for(Session, "before_flush")
def _refuse_changes_to_signed(session: Session, flush_context, instances) -> None:
    """The ORM's half of immutability (the database triggers are the other): a clear error before any SQL."""
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEvent) or (isinstance(obj, Review) and _was_signed(obj)):
            if obj in session.deleted or session.is_modified(obj):
                raise ImmutableRecordError(f"{type(obj).__name__} {obj.id} is immutable; save a new version instead.")


def _was_signed(review: Review) -> bool:
    from sqlalchemy import inspect

    hist = inspect(review).attrs.signed_at.history
    return bool(hist.deleted and hist.deleted[0] is not None) or (not hist.has_changes() and
                                                                   review.signed_at is not None)
