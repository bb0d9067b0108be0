"""Plans, organisations, workspaces, users and memberships. Keyword-only functions on an explicit session."""

from __future__ import annotations

import functools
import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from souverain.db.errors import Conflict, Forbidden, NotFound
from souverain.db.tables import AuditLog, Invitation, Membership, Organisation, Plan, User, WebSession, Workspace

ROLES = ("owner", "admin", "member")
PLAN_FIELDS = ("requests_per_second", "tokens_per_minute", "tokens_per_month", "allowed_models", "max_context",
               "priority", "max_concurrent", "max_queued", "finetune_max_seq_len", "finetune_max_batch",
               "finetune_max_steps", "finetune_max_file_bytes", "finetune_max_jobs", "cache_per_user")
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


@functools.cache
def _decoy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def password_record(s: Session, *, email: str) -> tuple[int, str] | None:
    """(user id, password hash) of an enabled user, for `verify_password` outside the transaction."""
    user = s.scalar(select(User).where(User.email == email.strip().lower()))
    return None if user is None or user.disabled else (user.id, user.password_hash)


def verify_password(password_hash: str | None, password: str) -> bool:
    """argon2id, constant time; with no hash (no such user) the same work is done against a decoy, so an
    unknown e-mail is not told apart by timing. Holds no database lock: call it outside any transaction."""
    try:
        return bool(_hasher.verify(password_hash or _decoy_hash(), password)) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return bool(_hasher.check_needs_rehash(password_hash))


def check_password(s: Session, *, email: str, password: str) -> User | None:
    """The user when the password is right, else None (for the CLI; the server verifies outside the
    transaction: `password_record` then `verify_password`)."""
    found = password_record(s, email=email)
    if not verify_password(found[1] if found else None, password) or found is None:
        return None
    user = s.get(User, found[0])
    if user is not None and needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


def set_password(s: Session, *, user: User, password: str, actor: str, revoke_sessions: bool = True) -> None:
    """A new password; every browser session of the user ends (unless only re-hashing the same one)."""
    if len(password) < 8:
        raise Conflict("a password needs at least 8 characters")
    user.password_hash = _hasher.hash(password)
    if revoke_sessions:
        end_sessions(s, user_id=user.id)
    audit(s, actor=actor, action="user.password", target=user.email)


def end_sessions(s: Session, *, user_id: int, org_id: int | None = None) -> None:
    """Sign the user out everywhere (or only of one organisation's sessions)."""
    q = delete(WebSession).where(WebSession.user_id == user_id)
    if org_id is not None:
        q = q.where(WebSession.org_id == org_id)
    s.execute(q)


def set_disabled(s: Session, *, user: User, disabled: bool, actor: str) -> None:
    user.disabled = disabled
    if disabled:
        end_sessions(s, user_id=user.id)
    audit(s, actor=actor, action="user.disable" if disabled else "user.enable", target=user.email)


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


def owners(s: Session, *, org: Organisation) -> int:
    return len(list(s.scalars(select(Membership.user_id).where(Membership.org_id == org.id,
                                                                Membership.role == "owner"))))


def change_role(s: Session, *, org: Organisation, user: User, role: str | None, by: str | None, actor: str) -> None:
    """Set (role) or remove (None) a member's role, as someone whose own role is `by` (None: the operator).
    Only an owner makes or unmakes owners; the last owner stays. Removal ends the user's sessions in the
    organisation and revokes the API keys they made there."""
    m = s.get(Membership, (user.id, org.id))
    if m is None:
        raise NotFound(f"{user.email} is not a member of {org.name!r}")
    if role is not None and role not in ROLES:
        raise Conflict(f"role must be one of {', '.join(ROLES)}")
    if "owner" in (m.role, role) and by not in ("owner", None):
        raise Forbidden("only an owner can make, change or remove an owner")
    if m.role == "owner" and role != "owner" and owners(s, org=org) <= 1:
        raise Conflict(f"{user.email} is the last owner of {org.name!r}: make another owner first")
    if role is None:
        s.delete(m)
        end_sessions(s, user_id=user.id, org_id=org.id)
        from souverain.db.keys import revoke_user_keys

        revoke_user_keys(s, user_id=user.id, org_id=org.id, actor=actor)
        audit(s, actor=actor, action="member.remove", org_id=org.id, target=user.email)
    else:
        m.role = role
        audit(s, actor=actor, action="member.set", org_id=org.id, target=user.email, detail={"role": role})
    s.flush()


INVITATION_DAYS = 7
MAX_PENDING_INVITATIONS = 200  # per organisation: an admin's script cannot grow the table without bound


def invite(s: Session, *, org: Organisation, email: str, role: str, actor: str, now: datetime
           ) -> tuple[str, Invitation]:
    """An invitation token (shown once) for `email` to join `org` as `role`; whether such a user exists is
    neither checked nor told."""
    email = email.strip().lower()
    if "@" not in email:
        raise Conflict(f"{email!r} is not an e-mail address")
    if role not in ROLES:
        raise Conflict(f"role must be one of {', '.join(ROLES)}")
    pending = s.scalars(select(Invitation.id).where(Invitation.org_id == org.id, Invitation.expires_at > now))
    if len(list(pending)) >= MAX_PENDING_INVITATIONS:
        raise Conflict(f"{org.name!r} has {MAX_PENDING_INVITATIONS} invitations waiting; let some expire first")
    token = "inv-" + secrets.token_urlsafe(24)
    row = Invitation(org_id=org.id, email=email, role=role, digest=_sha256(token), invited_by=actor, created_at=now,
                     expires_at=now + timedelta(days=INVITATION_DAYS))
    s.add(row)
    audit(s, actor=actor, action="member.invite", org_id=org.id, target=email, detail={"role": role})
    s.flush()
    return token, row


def find_invitation(s: Session, *, token: str, now: datetime) -> Invitation | None:
    row = s.scalar(select(Invitation).where(Invitation.digest == _sha256(token)))
    return row if row is not None and row.expires_at > now else None


def accept(s: Session, *, invitation: Invitation, user: User) -> Membership:
    """The invited user joins (an existing membership keeps the higher of the two roles)."""
    if user.email != invitation.email:
        raise Forbidden("this invitation is for another e-mail address")
    org = get_org(s, org_id=invitation.org_id)
    m = s.get(Membership, (user.id, org.id))
    if m is None or ROLES.index(invitation.role) < ROLES.index(m.role):
        m = add_member(s, org=org, user=user, role=invitation.role, actor=f"user:{user.id}")
    s.delete(invitation)
    s.flush()
    return m


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
