"""Organisations, users, keys: the repository functions on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest

from souverain.db import accounts, keys, usage
from souverain.db.bootstrap import bootstrap
from souverain.db.database import Database
from souverain.db.errors import Conflict, NotFound
from souverain.db.tables import ApiKey, AuditLog, utcnow


def test_key_lifecycle(db: Database) -> None:
    with db.session() as s:
        org = accounts.create_org(s, name="acme", plan="pro", actor="t")
        ws = accounts.get_workspace(s, org=org)
        row, secret = keys.create_key(s, workspace=ws, name="ci", actor="t")
        key_id = row.id
    assert secret.startswith("sk-sv-") and len(secret) > 40
    with db.session() as s:
        stored = s.get(ApiKey, key_id)
        assert stored is not None and secret not in (stored.digest, stored.prefix)  # only a hash is kept
        rec = keys.authenticate(s, key=secret)
        assert rec is not None and rec.org_id == org.id and rec.workspace_id == ws.id
        assert keys.stale_use(rec)  # never used: due for its first touch
        keys.touch(s, key_id=rec.id)
        s.refresh(stored)
        assert stored.last_used_at is not None and not keys.stale_use(keys.authenticate(s, key=secret))
        assert keys.authenticate(s, key=secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert keys.authenticate(s, key="sk-sv-short") is None
        assert [k.prefix for k, _ in keys.list_keys(s, org_id=org.id)] == [secret[:keys.VISIBLE]]
        keys.revoke_key(s, key=keys.find_key(s, org_id=org.id, ref=secret[:keys.VISIBLE]), actor="t", org_id=org.id)
    with db.session() as s:
        assert keys.authenticate(s, key=secret) is None
        actions = [a.action for a in s.query(AuditLog).order_by(AuditLog.id)]
        assert actions == ["org.create", "key.create", "key.revoke"]


def test_expired_key_is_refused(db: Database) -> None:
    with db.session() as s:
        org = accounts.create_org(s, name="acme", actor="t")
        _, secret = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t",
                                    expires_at=utcnow() + timedelta(hours=1))
    with db.session() as s:
        assert keys.authenticate(s, key=secret) is not None
        assert keys.authenticate(s, key=secret, now=utcnow() + timedelta(hours=2)) is None


def test_users_passwords_and_roles(db: Database) -> None:
    with db.session() as s:
        org = accounts.create_org(s, name="acme", actor="t")
        user = accounts.create_user(s, email="Ann@Acme.example", password="correct horse", actor="t")
        accounts.add_member(s, org=org, user=user, role="admin", actor="t")
        assert user.password_hash.startswith("$argon2id$")
        with pytest.raises(Conflict):
            accounts.create_user(s, email="ann@acme.example", password="another one", actor="t")
        with pytest.raises(Conflict):
            accounts.create_user(s, email="short@acme.example", password="short", actor="t")
        with pytest.raises(Conflict):
            accounts.add_member(s, org=org, user=user, role="god", actor="t")
    with db.session() as s:
        assert accounts.check_password(s, email="ann@acme.example", password="correct horse") is not None
        assert accounts.check_password(s, email="ann@acme.example", password="wrong horse") is None
        assert accounts.check_password(s, email="nobody@acme.example", password="correct horse") is None
        assert accounts.role_in(s, user_id=user.id, org_id=org.id) == "admin"
        with pytest.raises(NotFound):
            accounts.get_org(s, name="nope")
        with pytest.raises(NotFound):
            accounts.get_plan(s, name="platinum")


def test_first_start_creates_the_owner_once(db: Database) -> None:
    first = bootstrap(db)
    assert first is not None and bootstrap(db) is None
    with db.session() as s:
        user = accounts.check_password(s, email=first.email, password=first.password)
        assert user is not None
        rec = keys.authenticate(s, key=first.api_key)
        assert rec is not None and accounts.role_in(s, user_id=user.id, org_id=rec.org_id) == "owner"


def test_usage_rows_and_the_monthly_total(db: Database) -> None:
    with db.session() as s:
        org = accounts.create_org(s, name="acme", actor="t")
        ws = accounts.get_workspace(s, org=org)
    for i in range(5):
        with db.session() as s:
            usage.record(s, usage=usage.Usage(f"r{i}", "smollm2", "chat", 10, i, 5, "stop", org.id, ws.id))
    with db.session() as s:
        assert usage.month_tokens(s, org_id=org.id) == 50 + 0 + 1 + 2 + 3 + 4
        rows = usage.report(s, org_id=org.id)
        assert len(rows) == 1 and rows[0][1:] == ("default", "smollm2", 5, 50, 10, 60)
        assert len(usage.records(s, org_id=org.id)) == 5


def test_concurrent_writers_lose_no_tokens(db: Database) -> None:
    """The monthly total is bumped atomically: many threads, each its own transaction, add up exactly."""
    from concurrent.futures import ThreadPoolExecutor

    with db.session() as s:
        org_id = accounts.create_org(s, name="acme", actor="t").id

    def one(i: int) -> None:
        with db.session() as s:
            usage.record(s, usage=usage.Usage(f"r{i}", "m", "chat", 3, 4, 1, "stop", org_id))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(80)))
    with db.session() as s:
        assert usage.month_tokens(s, org_id=org_id) == 80 * 7
