"""Cases, eyes, visits, images, analyses and the audit trail.

Revision ID: 0001_initial
Revises:
Create Date: 2026-05-20
"""
import sqlalchemy as sa
from alembic import op

from retina_core.clinic.migrations.helpers import append_only, drop_append_only

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ref", sa.String(32), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
        sa.UniqueConstraint("ref", name="uq_cases_ref"),
    )
    op.create_index("ix_cases_patient_key", "cases", ["patient_key"])
    op.create_table(
        "eyes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("laterality", sa.String(2), nullable=False),
        sa.CheckConstraint("laterality IN ('OD', 'OS', 'U')", name="ck_eyes_laterality"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_eyes_case_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_eyes"),
        sa.UniqueConstraint("case_id", "laterality", name="uq_eyes_case_id_laterality"),
    )
    op.create_index("ix_eyes_case_id", "eyes", ["case_id"])
    op.create_table(
        "visits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("eye_id", sa.Integer(), nullable=False),
        sa.Column("visit_date", sa.Date(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["eye_id"], ["eyes.id"], name="fk_visits_eye_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_visits"),
        sa.UniqueConstraint("eye_id", "visit_date", name="uq_visits_eye_id_visit_date"),
    )
    op.create_index("ix_visits_eye_id", "visits", ["eye_id"])
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("stored_hash", sa.String(64), nullable=False),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("content_hash", name="uq_images_content_hash"),
    )
    op.create_table(
        "visit_images",
        sa.Column("visit_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("added_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["visit_id"], ["visits.id"], name="fk_visit_images_visit_id", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_visit_images_image_id"),
        sa.PrimaryKeyConstraint("visit_id", "image_id", name="pk_visit_images"),
    )
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("visit_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("weights_sha256", sa.String(64), nullable=True),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("target", sa.String(64), nullable=True),
        sa.Column("label", sa.String(64), nullable=True),
        sa.Column("referable", sa.Boolean(), nullable=True),
        sa.Column("suggestion", sa.Text(), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("trained_on", sa.Text(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("heatmap_hash", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(["visit_id"], ["visits.id"], name="fk_analyses_visit_id", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_analyses_image_id"),
        sa.PrimaryKeyConstraint("id", name="pk_analyses"),
    )
    op.create_index("ix_analyses_visit_id", "analyses", ["visit_id"])
    op.create_index("ix_analyses_image_id", "analyses", ["image_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    append_only("audit_events", "the audit trail is append-only")


def downgrade() -> None:
    drop_append_only("audit_events")
    op.drop_table("audit_events")
    op.drop_table("analyses")
    op.drop_table("visit_images")
    op.drop_table("images")
    op.drop_table("visits")
    op.drop_table("eyes")
    op.drop_table("cases")
