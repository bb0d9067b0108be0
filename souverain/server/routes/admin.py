"""/v1/admin: keys, workspaces, members, plans, usage and the audit log of an organisation.

Owners and admins manage their own organisation; a static (root) key manages any, named by `?org=`.
Plans and model visibility are the operator's: root only.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from souverain.db import accounts, keys, usage
from souverain.db import models as model_access
from souverain.db.tables import AuditLog, Organisation
from souverain.server.deps import CurrentCaller, Models, PlatformDep
from souverain.server.errors import APIError
from souverain.server.platform import Caller

router = APIRouter(prefix="/v1/admin", tags=["admin"])
OrgName = Annotated[str | None, Query(description="Organisation (root keys only; others act on their own)")]


class KeyCreate(BaseModel):
    name: str = Field("", max_length=128)
    workspace: str = Field("default", max_length=128)
    expires_in_days: float | None = Field(None, gt=0, le=36500)  # a century: past that, datetime overflows
    allowed_models: list[str] | None = None
    requests_per_second: float | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)


class WorkspaceCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=128)


class MemberSet(BaseModel):
    email: str = Field(..., min_length=3, max_length=256)
    role: Literal["owner", "admin", "member"] = "member"


class PlanChoice(BaseModel):
    plan: str = Field(..., min_length=1, max_length=64)


class PlanLimits(BaseModel):
    requests_per_second: float | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    tokens_per_month: int | None = Field(None, ge=0)
    allowed_models: list[str] | None = None
    max_context: int | None = Field(None, gt=0)
    priority: int = Field(1, ge=0, le=100)
    max_concurrent: int | None = Field(None, ge=1, le=100_000)  # sequences running at once (n counts)
    max_queued: int | None = Field(None, ge=0, le=100_000)  # sequences waiting beyond those
    finetune_max_seq_len: int | None = Field(None, ge=16, le=1 << 20)
    finetune_max_batch: int | None = Field(None, ge=1, le=1024)
    finetune_max_steps: int | None = Field(None, ge=1, le=10_000_000)
    finetune_max_file_bytes: int | None = Field(None, ge=1, le=1 << 40)
    finetune_max_jobs: int | None = Field(None, ge=1, le=1000)
    cache_per_user: bool = False  # prefix cache per user (or key) instead of per organisation


class OrgCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=128)
    plan: str = Field("free", min_length=1, max_length=64)


class Visibility(BaseModel):
    org: str = Field(..., min_length=1)


def admin(caller: CurrentCaller) -> Caller:
    if not caller.is_admin:
        raise APIError(403, "this needs an owner or admin of the organisation", type_="permission_error")
    return caller


def root(caller: CurrentCaller) -> Caller:
    if not caller.root:
        raise APIError(403, "this needs the operator's (static) key", type_="permission_error")
    return caller


Admin = Annotated[Caller, Depends(admin)]
Root = Annotated[Caller, Depends(root)]


def actor(caller: Caller) -> str:
    return {"key": f"key:{caller.key_id}", "session": f"user:{caller.user_id}"}.get(caller.kind, caller.kind)


def the_org(s: Session, caller: Caller, org: str | None) -> Organisation:
    if caller.root:
        if not org:
            raise APIError(400, "name the organisation with ?org=", param="org")
        return accounts.get_org(s, name=org)
    assert caller.org_id is not None
    if org and org != accounts.get_org(s, org_id=caller.org_id).name:
        raise APIError(403, "a key can only manage its own organisation", type_="permission_error", param="org")
    return accounts.get_org(s, org_id=caller.org_id)


def key_json(k: Any, ws: Any) -> dict[str, Any]:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "workspace": ws.name,
            "created_at": k.created_at.isoformat(), "last_used_at": k.last_used_at and k.last_used_at.isoformat(),
            "revoked_at": k.revoked_at and k.revoked_at.isoformat(),
            "expires_at": k.expires_at and k.expires_at.isoformat(), "allowed_models": k.allowed_models,
            "requests_per_second": k.requests_per_second, "tokens_per_minute": k.tokens_per_minute}


@router.get("/organisations")
def list_orgs(_: Root, plat: PlatformDep) -> dict[str, Any]:
    """Every organisation, its plan and this month's tokens (operator only)."""
    with plat.database("admin routes").session() as s:
        return {"object": "list", "data": [
            {"id": o.id, "name": o.name, "plan": accounts.org_plan(s, org_id=o.id).name,
             "month_tokens": usage.month_tokens(s, org_id=o.id, at=plat.now())} for o in accounts.list_orgs(s)]}


@router.post("/organisations", status_code=201)
def create_org(body: OrgCreate, caller: Root, plat: PlatformDep) -> dict[str, Any]:
    """A new organisation with a `default` workspace (operator only)."""
    with plat.database("admin routes").session() as s:
        o = accounts.create_org(s, name=body.name, plan=body.plan, actor=actor(caller))
        return {"id": o.id, "name": o.name, "plan": body.plan}


@router.get("/keys")
def list_keys(caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    """The organisation's API keys (prefixes only: secrets are never stored)."""
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        return {"object": "list", "data": [key_json(k, w) for k, w in keys.list_keys(s, org_id=o.id)]}


@router.post("/keys", status_code=201)
def create_key(body: KeyCreate, caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    """A new key; `key` is shown in this response only."""
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        ws = accounts.get_workspace(s, org=o, name=body.workspace)
        expires = plat.now() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
        row, secret = keys.create_key(s, workspace=ws, name=body.name, actor=actor(caller), user_id=caller.user_id,
                                      expires_at=expires, allowed_models=body.allowed_models,
                                      requests_per_second=body.requests_per_second,
                                      tokens_per_minute=body.tokens_per_minute)
        return {**key_json(row, ws), "key": secret}


@router.delete("/keys/{ref}")
def revoke_key(ref: str, caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    """Revoke a key (by id or prefix); it is refused from the next request on."""
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        row = keys.find_key(s, org_id=o.id, ref=ref)
        keys.revoke_key(s, key=row, actor=actor(caller), org_id=o.id)
        return {"id": row.id, "prefix": row.prefix, "revoked": True}


@router.get("/workspaces")
def list_workspaces(caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        return {"object": "list", "data": [{"id": w.id, "name": w.name, "created_at": w.created_at.isoformat()}
                                           for w in accounts.list_workspaces(s, org=o)]}


@router.post("/workspaces", status_code=201)
def create_workspace(body: WorkspaceCreate, caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        ws = accounts.create_workspace(s, org=the_org(s, caller, org), name=body.name, actor=actor(caller))
        return {"id": ws.id, "name": ws.name}


@router.get("/members")
def list_members(caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        return {"object": "list", "data": [{"email": u.email, "name": u.name, "role": r}
                                           for u, r in accounts.members(s, org=o)]}


@router.post("/members", status_code=201)
def set_member(body: MemberSet, caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    """Change a member's role, or invite someone who is not a member yet: the answer holds an invitation
    token (shown once) that the invitee accepts in the chat app (POST /app/api/invitations/accept). Whether
    the e-mail belongs to an existing account is never told. Only owners make, change or remove owners, and
    the last owner stays one."""
    by = None if caller.root else caller.role
    if body.role == "owner" and by not in ("owner", None):
        raise APIError(403, "only an owner can make owners", type_="permission_error", param="role")
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        member = next((u for u, _ in accounts.members(s, org=o) if u.email == body.email.strip().lower()), None)
        if member is not None:
            accounts.change_role(s, org=o, user=member, role=body.role, by=by, actor=actor(caller))
            return {"email": member.email, "role": body.role, "invitation": None, "expires_at": None}
        token, inv = accounts.invite(s, org=o, email=body.email, role=body.role, actor=actor(caller), now=plat.now())
        return {"email": inv.email, "role": inv.role, "invitation": token, "expires_at": inv.expires_at.isoformat()}


@router.delete("/members/{email}")
def remove_member(email: str, caller: Admin, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    """Remove a member: their sessions in this organisation end and the keys they made here are revoked."""
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        member = next((u for u, _ in accounts.members(s, org=o) if u.email == email.strip().lower()), None)
        if member is None:
            raise APIError(404, f"{email!r} is not a member of {o.name!r}", code="not_found")
        accounts.change_role(s, org=o, user=member, role=None, by=None if caller.root else caller.role,
                             actor=actor(caller))
        return {"email": member.email, "removed": True}


@router.get("/usage", response_model=None)
def usage_report(caller: Admin, plat: PlatformDep, org: OrgName = None, since: datetime | None = None,
                 format: Literal["json", "csv"] = "json") -> Any:
    """Usage per day, workspace and model (JSON, or CSV with `format=csv`)."""
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        rows = usage.report(s, org_id=o.id, since=since)
        month = usage.month_tokens(s, org_id=o.id, at=plat.now())
    if format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(usage.REPORT_COLUMNS)
        w.writerows(rows)
        return PlainTextResponse(buf.getvalue(), media_type="text/csv")
    return {"object": "list", "month_tokens": month,
            "data": [dict(zip(usage.REPORT_COLUMNS, r, strict=True)) for r in rows]}


@router.get("/audit")
def audit_log(caller: Admin, plat: PlatformDep, org: OrgName = None, limit: int = Query(100, ge=1, le=1000)
              ) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        rows = s.scalars(select(AuditLog).where(AuditLog.org_id == o.id).order_by(AuditLog.id.desc()).limit(limit))
        return {"object": "list", "data": [{"at": a.at.isoformat(), "actor": a.actor, "action": a.action,
                                            "target": a.target, "detail": a.detail} for a in rows]}


@router.get("/plans")
def list_plans(_: Admin, plat: PlatformDep) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        return {"object": "list", "data": [{"name": p.name, **{f: getattr(p, f) for f in accounts.PLAN_FIELDS}}
                                           for p in accounts.list_plans(s)]}


@router.put("/plans/{name}")
def set_plan(name: str, body: PlanLimits, caller: Root, plat: PlatformDep) -> dict[str, Any]:
    """Create or change a plan's limits (null = unlimited; fields not sent keep their values)."""
    with plat.database("admin routes").session() as s:
        p = accounts.set_plan_limits(s, name=name, actor=actor(caller), create=True,
                                     **body.model_dump(exclude_unset=True))
        return {"name": p.name, **{f: getattr(p, f) for f in accounts.PLAN_FIELDS}}


@router.put("/organisation/plan")
def set_org_plan(body: PlanChoice, caller: Root, plat: PlatformDep, org: OrgName = None) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        o = the_org(s, caller, org)
        accounts.set_org_plan(s, org=o, plan=body.plan, actor=actor(caller))
        return {"org": o.name, "plan": body.plan}


@router.put("/models/{model:path}/private")
def make_private(model: str, body: Visibility, caller: Root, plat: PlatformDep) -> dict[str, Any]:
    """Make a model visible only to the organisations it is shared with (call once per organisation)."""
    with plat.database("admin routes").session() as s:
        o = accounts.get_org(s, name=body.org)
        model_access.share_model(s, model=model, org_id=o.id, actor=actor(caller))
        return {"model": model, "private": True, "organisations": sorted(model_access.private_models(s)[model])}


@router.delete("/models/{model:path}/private")
def make_open(model: str, caller: Root, plat: PlatformDep) -> dict[str, Any]:
    with plat.database("admin routes").session() as s:
        model_access.open_model(s, model=model, actor=actor(caller))
        return {"model": model, "private": False}


@router.post("/models/{model:path}/unload")
async def unload_model(model: str, _: Root, models: Models) -> dict[str, Any]:
    """Free a model's memory now (`souverain stop`); its next request loads it again. 409 while it is answering."""
    found = models.get(model)
    if found is None:
        raise APIError(404, f"model {model!r} not found; see GET /v1/models", param="model", code="model_not_found")
    engine = found.engine
    if engine.rebuild is None:
        raise APIError(400, f"model {model!r} was built in memory and cannot be loaded again", param="model")
    if not await run_in_threadpool(engine.unload):
        stats = engine.engine.stats
        raise APIError(409, f"model {model!r} is answering ({stats.running} running, {stats.waiting} waiting); "
                            "stop it once they end", code="model_busy")
    return {"model": found.id, "loaded": False}


@router.post("/models/{model:path}/load")
async def load_model(model: str, _: Root, models: Models) -> dict[str, Any]:
    """Load a model now (rather than on its first request)."""
    found = models.get(model)
    if found is None:
        raise APIError(404, f"model {model!r} not found; see GET /v1/models", param="model", code="model_not_found")
    await run_in_threadpool(found.engine.ensure_loaded)
    return {"model": found.id, "loaded": True}
