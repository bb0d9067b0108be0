"""Plans, organisations, workspaces, users and memberships. Keyword-only functions on an explicit session."""

from __future__ import annotations

import secrets
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from souverain.db.errors import Conflict, NotFound
from souverain.db.tables import AuditLog, Membership, Organisation, Plan, User, Workspace

ROLES = ("owner", "admin", "member")
PLAN_FIELDS = ("requests_per_second", "tokens_per_minute", "tokens_per_month", "allowed_models", "max_context",
               "priority", "max_concurrent", "max_queued", "finetune_max_seq_len", "finetune_max_batch",
               "finetune_max_steps", "finetune_max_file_bytes", "finetune_max_jobs")
_hasher = PasswordHasher()


def audit(s: Session, *, actor: str, action: str, org_id: int | None = None, target: str = "",
          detail: dict[str, Any] | None = None) -> None:
    s.add(AuditLog(actor=actor, action=action, org_id=org_id, target=target, detail=detail))


def get_plan(s: Session, *, name: str) -> Plan:
    plan = s.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        names = ", ".join(s.scalars(select(Plan.name)))
        raise NotFound(f"no plan named {name!r} (plans: {names})")
    return plan


def list_plans(s: Session) -> list[Plan]:
    return list(s.scalars(select(Plan).order_by(Plan.priority.desc(), Plan.id)))


def set_plan_limits(s: Session, *, name: str, actor: str, create: bool = False, **limits: Any) -> Plan:
    """Change (or create) a plan's limits; unknown fields are refused."""
    unknown = set(limits) - set(PLAN_FIELDS)
    if unknown:
        raise Conflict(f"unknown plan fields: {', '.join(sorted(unknown))}")
    plan = s.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        if not create:
            get_plan(s, name=name)
        plan = Plan(name=name, priority=limits.pop("priority", 1))
        s.add(plan)
    for k, v in limits.items():
        setattr(plan, k, v)
    audit(s, actor=actor, action="plan.set", target=name, detail=limits)
    s.flush()
    return plan


def create_org(s: Session, *, name: str, plan: str = "free", actor: str) -> Organisation:
    if s.scalar(select(Organisation).where(Organisation.name == name)) is not None:
        raise Conflict(f"organisation {name!r} already exists")
    org = Organisation(name=name, plan_id=get_plan(s, name=plan).id)
    s.add(org)
    s.flush()
    s.add(Workspace(org_id=org.id, name="default"))
    audit(s, actor=actor, action="org.create", org_id=org.id, target=name, detail={"plan": plan})
    s.flush()
    return org


def get_org(s: Session, *, name: str | None = None, org_id: int | None = None) -> Organisation:
    org = (s.get(Organisation, org_id) if org_id is not None
           else s.scalar(select(Organisation).where(Organisation.name == name)))
    if org is None:
        raise NotFound(f"no organisation {name or org_id!r}")
    return org


def list_orgs(s: Session) -> list[Organisation]:
    return list(s.scalars(select(Organisation).order_by(Organisation.id)))


def set_org_plan(s: Session, *, org: Organisation, plan: str, actor: str) -> None:
    org.plan_id = get_plan(s, name=plan).id
    audit(s, actor=actor, action="org.plan", org_id=org.id, target=org.name, detail={"plan": plan})


def org_plan(s: Session, *, org_id: int) -> Plan:
    plan = s.scalar(select(Plan).join(Organisation, Organisation.plan_id == Plan.id).where(Organisation.id == org_id))
    if plan is None:
        raise NotFound(f"no organisation {org_id}")
    return plan


def create_workspace(s: Session, *, org: Organisation, name: str, actor: str) -> Workspace:
    if s.scalar(select(Workspace).where(Workspace.org_id == org.id, Workspace.name == name)) is not None:
        raise Conflict(f"workspace {name!r} already exists in {org.name!r}")
    ws = Workspace(org_id=org.id, name=name)
    s.add(ws)
    audit(s, actor=actor, action="workspace.create", org_id=org.id, target=name)
    s.flush()
    return ws


def get_workspace(s: Session, *, org: Organisation, name: str = "default") -> Workspace:
    ws = s.scalar(select(Workspace).where(Workspace.org_id == org.id, Workspace.name == name))
    if ws is None:
        raise NotFound(f"no workspace {name!r} in organisation {org.name!r}")
    return ws


def list_workspaces(s: Session, *, org: Organisation) -> list[Workspace]:
    return list(s.scalars(select(Workspace).where(Workspace.org_id == org.id).order_by(Workspace.id)))


def new_password() -> str:
    return secrets.token_urlsafe(12)


def create_user(s: Session, *, email: str, password: str, name: str = "", actor: str, org_id: int | None = None
                ) -> User:
    email = email.strip().lower()
    if "@" not in email:
        raise Conflict(f"{email!r} is not an e-mail address")
    if len(password) < 8:
        raise Conflict("a password needs at least 8 characters")
    if s.scalar(select(User).where(User.email == email)) is not None:
        raise Conflict(f"user {email!r} already exists")
    user = User(email=email, name=name or email.split("@")[0], password_hash=_hasher.hash(password))
    s.add(user)
    audit(s, actor=actor, action="user.create", org_id=org_id, target=email)
    s.flush()
    return user


def get_user(s: Session, *, email: str | None = None, user_id: int | None = None) -> User:
    user = (s.get(User, user_id) if user_id is not None
            else s.scalar(select(User).where(User.email == (email or "").strip().lower())))
    if user is None:
        raise NotFound(f"no user {email or user_id!r}")
    return user


def check_password(s: Session, *, email: str, password: str) -> User | None:
    """The user when the password is right (argon2id, constant time), else None."""
    user = s.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None or user.disabled:
        _hasher.hash(password)  # same cost either way: no user enumeration by timing
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


def set_password(s: Session, *, user: User, password: str, actor: str) -> None:
    if len(password) < 8:
        raise Conflict("a password needs at least 8 characters")
    user.password_hash = _hasher.hash(password)
    audit(s, actor=actor, action="user.password", target=user.email)


def add_member(s: Session, *, org: Organisation, user: User, role: str, actor: str) -> Membership:
    if role not in ROLES:
        raise Conflict(f"role must be one of {', '.join(ROLES)}")
    m = s.get(Membership, (user.id, org.id))
    if m is None:
        m = Membership(user_id=user.id, org_id=org.id, role=role)
        s.add(m)
    m.role = role
    audit(s, actor=actor, action="member.set", org_id=org.id, target=user.email, detail={"role": role})
    s.flush()
    return m


def memberships(s: Session, *, user: User) -> list[tuple[Organisation, str]]:
    rows = s.execute(select(Organisation, Membership.role).join(Membership, Membership.org_id == Organisation.id)
                     .where(Membership.user_id == user.id).order_by(Organisation.id))
    return [(o, r) for o, r in rows]


def role_in(s: Session, *, user_id: int | None, org_id: int) -> str | None:
    if user_id is None:
        return None
    m = s.get(Membership, (user_id, org_id))
    return m.role if m else None


def members(s: Session, *, org: Organisation) -> list[tuple[User, str]]:
    rows = s.execute(select(User, Membership.role).join(Membership, Membership.user_id == User.id)
                     .where(Membership.org_id == org.id).order_by(User.id))
    return [(u, r) for u, r in rows]
