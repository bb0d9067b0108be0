"""Fine-tuning: uploaded files and jobs.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE")),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("num_lines", sa.Integer),
        sa.Column("sample_type", sa.String(32), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE")),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_files", sa.JSON, nullable=False),
        sa.Column("validation_files", sa.JSON, nullable=False),
        sa.Column("suffix", sa.String(64)),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("auto_start", sa.Boolean, nullable=False),
        sa.Column("start_requested", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(32), nullable=False, index=True),
        sa.Column("fine_tuned_model", sa.String(256)),
        sa.Column("trained_tokens", sa.BigInteger, nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("checkpoints", sa.JSON, nullable=False),
        sa.Column("worker_pid", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("modified_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fine_tuning_jobs")
    op.drop_table("files")
