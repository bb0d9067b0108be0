"""Migrations: an empty database and one made by the first migration both reach head, and head is the model."""

from __future__ import annotations

import contextlib
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from souverain.db import accounts
from souverain.db.database import MIGRATIONS, alembic_config, open_database
from souverain.db.tables import Base


def head() -> str:
    cfg = alembic_config(None)
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


def test_empty_database_reaches_head_and_matches_the_tables(db_url: str) -> None:
    db = open_database(db_url)
    try:
        assert db.revision() == head()
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        with db.session() as s:
            assert [p.name for p in accounts.list_plans(s)] == ["free", "pro", "enterprise"]
        assert db.integrity_check() == []
    finally:
        db.close()


def test_database_from_the_first_migration_upgrades_keeping_its_rows(db_url: str) -> None:
    db = open_database(db_url, migrate=False)
    try:
        db.migrate("0001")
        with db.engine.begin() as conn:  # plain SQL: today's ORM classes know columns 0001 did not have
            conn.execute(text("INSERT INTO organisations (name, plan_id, created_at) "
                              "SELECT 'old', id, CURRENT_TIMESTAMP FROM plans WHERE name = 'pro'"))
            org_id = conn.execute(text("SELECT id FROM organisations WHERE name = 'old'")).scalar_one()
        db.migrate()
        assert db.revision() == head()
        with db.session() as s:
            assert accounts.get_org(s, org_id=org_id).name == "old"
            assert accounts.org_plan(s, org_id=org_id).max_concurrent == 32  # 0005 gave the plans their caps
    finally:
        db.close()


def test_migration_files_are_a_single_chain() -> None:
    script = ScriptDirectory.from_config(alembic_config(None))
    assert len(script.get_heads()) == 1
    assert (MIGRATIONS / "versions" / "0001_platform.py").exists()


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    # All migrations run in one transaction: break the second statement of an upgrade and nothing stays.
    url = f"sqlite:///{tmp_path / 'x.db'}"
    db = open_database(url, migrate=False)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("CREATE TABLE workspaces (id INTEGER PRIMARY KEY)"))  # a clash half-way through
        with contextlib.suppress(Exception):  # any error will do; what matters is what is left
            db.migrate()
        with db.engine.connect() as conn:
            names = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
        assert names == {"workspaces"}  # no plans/organisations table, no alembic_version
    finally:
        db.close()
