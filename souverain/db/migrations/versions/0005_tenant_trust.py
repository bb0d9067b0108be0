"""Tenant trust: usage rows opened at admission (updated_at: the last progress written), fair-sharing and
fine-tuning limits per plan, and invitations to an organisation.

Revision ID: 0005
Revises: 0004
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Per plan: running sequences, queued sequences (n counts), and fine-tuning caps. None = unlimited.
LIMITS: dict[str, dict[str, Any]] = {
    "free": {"max_concurrent": 4, "max_queued": 16, "finetune_max_seq_len": 2048, "finetune_max_batch": 4,
             "finetune_max_steps": 200, "finetune_max_file_bytes": 16 << 20, "finetune_max_jobs": 1},
    "pro": {"max_concurrent": 32, "max_queued": 128, "finetune_max_seq_len": 8192, "finetune_max_batch": 8,
            "finetune_max_steps": 5000, "finetune_max_file_bytes": 256 << 20, "finetune_max_jobs": 2},
}
PLAN_COLUMNS = ("max_concurrent", "max_queued", "finetune_max_seq_len", "finetune_max_batch", "finetune_max_steps",
                "finetune_max_file_bytes", "finetune_max_jobs")


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime, nullable=True))
    with op.batch_alter_table("plans") as batch:
        for name in PLAN_COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger if name.endswith("bytes") else sa.Integer, nullable=True))
    # Prefix-cache isolation: per organisation (default) or per user, so that members cannot probe each other's
    # prompts by timing. (No CHECK constraint: with one, SQLite would rebuild the table the organisations
    # reference.)
    op.add_column("plans", sa.Column("cache_per_user", sa.Boolean(create_constraint=False), nullable=False,
                                     server_default=sa.false()))
    plans = sa.table("plans", sa.column("name", sa.String), *(sa.column(c, sa.Integer) for c in PLAN_COLUMNS))
    for name, values in LIMITS.items():
        op.execute(plans.update().where(plans.c.name == name).values(**values))
    op.create_table(
        "invitations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("email", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("invited_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_usage_records_status", "usage_records", ["status"])


def downgrade() -> None:
    op.drop_index("ix_usage_records_status", "usage_records")
    op.drop_table("invitations")
    with op.batch_alter_table("plans") as batch:
        for name in (*PLAN_COLUMNS, "cache_per_user"):
            batch.drop_column(name)
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("updated_at")
