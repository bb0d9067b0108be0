"""Usage rows, the monthly totals that quotas read, and reports per workspace, model and day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import String, cast, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from souverain.db.tables import UsageRecord, UsageTotal, Workspace, utcnow


@dataclass(frozen=True)
class Usage:
    request_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    status: str
    org_id: int | None = None
    workspace_id: int | None = None
    key_id: int | None = None
    user_id: int | None = None


def month_of(at: datetime) -> str:
    return at.strftime("%Y-%m")


def record(s: Session, *, usage: Usage, at: datetime | None = None) -> None:
    """Insert the row and add its tokens to the organisation's month, in the caller's transaction."""
    at = at or utcnow()
    s.add(UsageRecord(created_at=at, updated_at=at, **usage.__dict__))
    if usage.org_id is None:
        return
    _bump_month(s, org_id=usage.org_id, at=at, tokens=usage.prompt_tokens + usage.completion_tokens)


def _bump_month(s: Session, *, org_id: int, at: datetime, tokens: int) -> None:
    # One atomic upsert: several server processes can bump the same month without losing updates or racing
    # on the month's first row.
    insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(UsageTotal).values(org_id=org_id, month=month_of(at), tokens=tokens)
    s.execute(stmt.on_conflict_do_update(index_elements=["org_id", "month"],
                                         set_={"tokens": UsageTotal.tokens + tokens}))


def write_progress(s: Session, *, usage: Usage, row_id: int | None, completion_tokens: int, billed: int,
                   status: str, latency_ms: int, at: datetime) -> int:
    """Open (row_id None) or update a request's row with its completion tokens so far; the organisation's
    month gains what was not billed yet (the prompt when the row opens, then `completion_tokens - billed`).
    Returns the row's id."""
    if row_id is None:
        row = UsageRecord(created_at=at, updated_at=at, **{**usage.__dict__, "completion_tokens": completion_tokens,
                                                            "status": status, "latency_ms": latency_ms})
        s.add(row)
        s.flush()
        row_id, new = row.id, usage.prompt_tokens + completion_tokens
    else:
        s.execute(update(UsageRecord).where(UsageRecord.id == row_id).values(
            completion_tokens=completion_tokens, status=status, latency_ms=latency_ms, updated_at=at))
        new = completion_tokens - billed
    if usage.org_id is not None and new:
        _bump_month(s, org_id=usage.org_id, at=at, tokens=new)
    return row_id


@dataclass(frozen=True)
class Progress:
    """One request's state for `write_batch`: `row_id` None opens its row; `billed` is what its row held."""

    usage: Usage
    row_id: int | None
    completion_tokens: int
    billed: int
    status: str
    latency_ms: int


def write_batch(s: Session, *, rows: list[Progress], at: datetime) -> list[int]:
    """`write_progress` for many requests in few statements: one insert per new row, one executemany update
    for the others, one upsert per organisation for the month. Returns the rows' ids, in order."""
    ids: list[int | None] = [p.row_id for p in rows]
    month: dict[int, int] = {}
    updates = []
    for i, p in enumerate(rows):
        if p.row_id is None:
            ids[i] = write_progress(s, usage=p.usage, row_id=None, completion_tokens=p.completion_tokens, billed=0,
                                    status=p.status, latency_ms=p.latency_ms, at=at)
            continue
        updates.append({"id": p.row_id, "completion_tokens": p.completion_tokens, "status": p.status,
                        "latency_ms": p.latency_ms, "updated_at": at})
        if p.usage.org_id is not None and p.completion_tokens != p.billed:
            month[p.usage.org_id] = month.get(p.usage.org_id, 0) + p.completion_tokens - p.billed
    if updates:
        s.execute(update(UsageRecord), updates)  # by primary key: one executemany
    for org_id, tokens in month.items():
        _bump_month(s, org_id=org_id, at=at, tokens=tokens)
    return [i for i in ids if i is not None]


def settle_stale(s: Session, *, before: datetime) -> int:
    """Rows still `running` that no server touched since `before`: their server died. Their tokens were
    billed as they were written; the status says what happened."""
    result = s.execute(update(UsageRecord).where(UsageRecord.status == "running",
                                                 (UsageRecord.updated_at < before) | UsageRecord.updated_at.is_(None))
                       .values(status="interrupted"))
    return int(getattr(result, "rowcount", 0) or 0)


def month_tokens(s: Session, *, org_id: int, at: datetime | None = None) -> int:
    total = s.scalar(select(UsageTotal.tokens).where(UsageTotal.org_id == org_id,
                                                     UsageTotal.month == month_of(at or utcnow())))
    return int(total or 0)


REPORT_COLUMNS = ("day", "workspace", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens")


def report(s: Session, *, org_id: int, since: datetime | None = None) -> list[tuple[str, str, str, int, int, int, int]]:
    """Usage grouped by day, workspace and model."""
    day = func.substr(cast(UsageRecord.created_at, String), 1, 10)
    q = (select(day, func.coalesce(Workspace.name, "-"), UsageRecord.model, func.count(),
                func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens))
         .outerjoin(Workspace, Workspace.id == UsageRecord.workspace_id)
         .where(UsageRecord.org_id == org_id).group_by(day, Workspace.name, UsageRecord.model)
         .order_by(day, Workspace.name, UsageRecord.model))
    if since is not None:
        q = q.where(UsageRecord.created_at >= since)
    return [(str(d), str(w), str(m), int(n), int(p or 0), int(c or 0), int((p or 0) + (c or 0)))
            for d, w, m, n, p, c in s.execute(q)]


def records(s: Session, *, org_id: int | None = None, request_id: str | None = None) -> list[UsageRecord]:
    q = select(UsageRecord).order_by(UsageRecord.id)
    if org_id is not None:
        q = q.where(UsageRecord.org_id == org_id)
    if request_id is not None:
        q = q.where(UsageRecord.request_id == request_id)
    return list(s.scalars(q))
