"""Platform tables: plans, organisations, workspaces, users, memberships, keys, usage, private models, audit.

Revision ID: 0001
Revises:
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The plans every installation starts with (editable afterwards: `souverain plans set`).
PLANS: list[dict[str, Any]] = [
    {"name": "free", "requests_per_second": 1.0, "tokens_per_minute": 20_000, "tokens_per_month": 1_000_000,
     "allowed_models": None, "max_context": 8192, "priority": 2},
    {"name": "pro", "requests_per_second": 10.0, "tokens_per_minute": 200_000, "tokens_per_month": 50_000_000,
     "allowed_models": None, "max_context": None, "priority": 1},
    {"name": "enterprise", "requests_per_second": None, "tokens_per_minute": None, "tokens_per_month": None,
     "allowed_models": None, "max_context": None, "priority": 0},
]


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("requests_per_second", sa.Float),
        sa.Column("tokens_per_minute", sa.BigInteger),
        sa.Column("tokens_per_month", sa.BigInteger),
        sa.Column("allowed_models", sa.JSON),
        sa.Column("max_context", sa.Integer),
        sa.Column("priority", sa.Integer, nullable=False),
    )
    op.create_table(
        "organisations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("plan_id", sa.Integer, sa.ForeignKey("plans.id"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "workspaces",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("org_id", "name"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(256), nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("workspace_id", sa.Integer, sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False, unique=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_used_at", sa.DateTime),
        sa.Column("revoked_at", sa.DateTime),
        sa.Column("expires_at", sa.DateTime),
        sa.Column("allowed_models", sa.JSON),
        sa.Column("requests_per_second", sa.Float),
        sa.Column("tokens_per_minute", sa.BigInteger),
    )
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="SET NULL")),
        sa.Column("workspace_id", sa.Integer, sa.ForeignKey("workspaces.id", ondelete="SET NULL")),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="SET NULL")),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Index("ix_usage_org_time", "org_id", "created_at"),
    )
    op.create_table(
        "usage_totals",
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("month", sa.String(7), primary_key=True),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "private_models",
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("org_id", sa.Integer),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("detail", sa.JSON),
        sa.Column("note", sa.Text),
    )
    op.bulk_insert(plans, PLANS)


def downgrade() -> None:
    for table in ("audit_log", "private_models", "usage_totals", "usage_records", "api_keys", "memberships", "users",
                  "workspaces", "organisations", "plans"):
        op.drop_table(table)
