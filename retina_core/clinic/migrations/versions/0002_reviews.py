"""Versioned clinician reviews (a signed version is immutable) and each case's last activity (for the worklist).

An existing database upgrades in place: cases keep their rows and get last_activity_at = created_at.

Revision ID: 0002_reviews
Revises: 0001_initial
Create Date: 2026-05-20
"""
import sqlalchemy as sa
from alembic import op

from retina_core.clinic.migrations.helpers import append_only, drop_append_only

revision = "0002_reviews"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("based_on_version", sa.Integer(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("corrected_label", sa.String(64), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("decision IN ('agree', 'disagree', 'corrected')", name="ck_reviews_decision"),
        sa.CheckConstraint("decision <> 'corrected' OR corrected_label IS NOT NULL",
                           name="ck_reviews_corrected_label"),
        sa.ForeignKeyConstraint(["analysis_id"], ["analyses.id"], name="fk_reviews_analysis_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.UniqueConstraint("analysis_id", "version", name="uq_reviews_analysis_id_version"),
    )
    append_only("reviews", "a signed review is immutable; save a new version", "OLD.signed_at IS NOT NULL")
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE cases SET last_activity_at = created_at WHERE last_activity_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("last_activity_at")
    drop_append_only("reviews")
    op.drop_table("reviews")
