"""Accounts and roles: users (argon2id password hashes, lock-out state, single-sign-on subject), their sessions,
the account beside each free-text name (reviews, analyses, audit events), and the source DICOM's UIDs of an image.

An existing database upgrades in place: earlier rows keep their names and get no account (NULL).

Revision ID: 0003_accounts
Revises: 0002_reviews
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

from retina_core.clinic.migrations.helpers import append_only, drop_append_only

revision = "0003_accounts"
down_revision = "0002_reviews"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
REVIEW_RULE = ("a signed review is immutable; save a new version", "OLD.signed_at IS NOT NULL")
AUDIT_RULE = ("the audit trail is append-only",)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("roles", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=True),
        sa.Column("oidc_subject", sa.String(255), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_login_at", TZ, nullable=True),
        sa.Column("password_changed_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
        sa.UniqueConstraint("oidc_subject", name="uq_users_oidc_subject"),
    )
    op.create_table(
        "user_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_seen_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("ended_at", TZ, nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_user_sessions_user_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_user_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_user_sessions_token_hash"),
    )
    op.create_index("ix_user_sessions_user_id", "user_sessions", ["user_id"])
    # Plain ALTER TABLE ADD COLUMN on both databases: no table is rebuilt, so the append-only triggers stay.
    _add_user_reference("reviews", "reviewer_id")
    _add_user_reference("analyses", "created_by_id")
    op.add_column("audit_events", sa.Column("user_id", sa.Integer(), nullable=True))
    op.create_index("ix_audit_events_user_id", "audit_events", ["user_id"])
    op.add_column("images", sa.Column("dicom_refs", sa.JSON(), nullable=True))


def _add_user_reference(table: str, column: str) -> None:
    """A nullable column referencing users.id (SQLite: inline REFERENCES, which ALTER TABLE ADD COLUMN allows)."""
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER "
                   f"CONSTRAINT fk_{table}_{column} REFERENCES users (id)")
    else:
        op.add_column(table, sa.Column(column, sa.Integer(), nullable=True))
        op.create_foreign_key(f"fk_{table}_{column}", table, "users", [column], ["id"])


def _drop_user_reference(table: str, column: str) -> None:
    if op.get_bind().dialect.name == "sqlite":          # the table is rebuilt without the column and its reference
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
    else:
        op.drop_constraint(f"fk_{table}_{column}", table, type_="foreignkey")
        op.drop_column(table, column)


def downgrade() -> None:
    # SQLite drops a column by rebuilding the table, which loses its triggers: drop them first, then restore.
    with op.batch_alter_table("images") as batch:
        batch.drop_column("dicom_refs")
    op.drop_index("ix_audit_events_user_id", table_name="audit_events")
    drop_append_only("audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("user_id")
    append_only("audit_events", *AUDIT_RULE)
    _drop_user_reference("analyses", "created_by_id")
    drop_append_only("reviews")
    _drop_user_reference("reviews", "reviewer_id")
    append_only("reviews", *REVIEW_RULE)
    op.drop_index("ix_user_sessions_user_id", table_name="user_sessions")
    op.drop_table("user_sessions")
    op.drop_table("users")
