"""API keys: created once (the secret is shown only then), stored as sha256 digests, looked up by prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from souverain.db.accounts import audit
from souverain.db.errors import NotFound
from souverain.db.tables import ApiKey, Workspace, utcnow

KEY_PREFIX = "sk-sv-"
VISIBLE = len(KEY_PREFIX) + 8  # the part listings show
TOUCH_EVERY = timedelta(seconds=60)  # last_used_at is refreshed at most this often (one write, not one per request)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """What a request needs to know about the key it came with."""

    id: int
    workspace_id: int
    org_id: int
    user_id: int | None
    name: str
    allowed_models: tuple[str, ...] | None
    requests_per_second: float | None
    tokens_per_minute: int | None
    last_used_at: datetime | None = None


def create_key(s: Session, *, workspace: Workspace, name: str = "", actor: str, user_id: int | None = None,
               expires_at: datetime | None = None, allowed_models: list[str] | None = None,
               requests_per_second: float | None = None, tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
    """A new key: (row, secret). The secret is not stored and cannot be shown again."""
    while True:
        secret = KEY_PREFIX + secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")
        if s.scalar(select(ApiKey.id).where(ApiKey.prefix == secret[:VISIBLE])) is None:
            break
    row = ApiKey(workspace_id=workspace.id, user_id=user_id, name=name, prefix=secret[:VISIBLE],
                 digest=digest(secret), expires_at=expires_at, allowed_models=allowed_models,
                 requests_per_second=requests_per_second, tokens_per_minute=tokens_per_minute)
    s.add(row)
    s.flush()
    audit(s, actor=actor, action="key.create", org_id=workspace.org_id, target=row.prefix,
          detail={"name": name, "workspace": workspace.name})
    return row, secret


def authenticate(s: Session, *, key: str, now: datetime | None = None) -> KeyRecord | None:
    """The key's record when it exists, is not revoked and has not expired; None otherwise."""
    now = now or utcnow()
    if not key.startswith(KEY_PREFIX) or len(key) <= VISIBLE:
        return None
    row = s.scalar(select(ApiKey).where(ApiKey.prefix == key[:VISIBLE]))
    if row is None or not hmac.compare_digest(row.digest, digest(key)):
        return None
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    ws = s.get(Workspace, row.workspace_id)
    assert ws is not None  # foreign key
    return KeyRecord(row.id, row.workspace_id, ws.org_id, row.user_id, row.name,
                     tuple(row.allowed_models) if row.allowed_models is not None else None,
                     row.requests_per_second, row.tokens_per_minute, row.last_used_at)


def stale_use(rec: KeyRecord, now: datetime | None = None) -> bool:
    """Whether the key's last-used time is due for an update (written at most every TOUCH_EVERY)."""
    return rec.last_used_at is None or (now or utcnow()) - rec.last_used_at > TOUCH_EVERY


def touch(s: Session, *, key_id: int, now: datetime | None = None) -> None:
    s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now or utcnow()))


def list_keys(s: Session, *, org_id: int, workspace_id: int | None = None) -> list[tuple[ApiKey, Workspace]]:
    q = select(ApiKey, Workspace).join(Workspace, Workspace.id == ApiKey.workspace_id).where(Workspace.org_id == org_id)
    if workspace_id is not None:
        q = q.where(Workspace.id == workspace_id)
    return [(k, w) for k, w in s.execute(q.order_by(ApiKey.id))]


def find_key(s: Session, *, org_id: int, ref: str) -> ApiKey:
    """A key of this organisation by id or visible prefix."""
    q = select(ApiKey).join(Workspace, Workspace.id == ApiKey.workspace_id).where(Workspace.org_id == org_id)
    # An id is ASCII digits that fit a BIGINT ("²" is a digit to str.isdigit and not to int(); 20 digits overflow).
    by_id = ref.isascii() and ref.isdigit() and len(ref) <= 18
    row = s.scalar(q.where(ApiKey.id == int(ref)) if by_id else q.where(ApiKey.prefix == ref[:VISIBLE]))
    if row is None:
        raise NotFound(f"no API key {ref!r} in this organisation")
    return row


def revoke_key(s: Session, *, key: ApiKey, actor: str, org_id: int) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    audit(s, actor=actor, action="key.revoke", org_id=org_id, target=key.prefix)


def revoke_user_keys(s: Session, *, user_id: int, org_id: int, actor: str) -> int:
    """Revoke every live key `user_id` made in `org_id` (they left it). Returns how many."""
    rows = [k for k, _ in list_keys(s, org_id=org_id) if k.user_id == user_id and k.revoked_at is None]
    for k in rows:
        revoke_key(s, key=k, actor=actor, org_id=org_id)
    return len(rows)
