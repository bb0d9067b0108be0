"""The first start: an owner account, its organisation and a first API key, printed once."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from souverain.db import accounts, keys
from souverain.db.database import Database
from souverain.db.tables import Organisation

OWNER_EMAIL = "admin@localhost"


@dataclass(frozen=True)
class FirstStart:
    email: str
    password: str
    api_key: str


def bootstrap(db: Database, org_name: str = "default", plan: str = "enterprise") -> FirstStart | None:
    """Create the owner and a key when the database has no organisation yet; None when it has one."""
    with db.session() as s:
        if s.scalar(select(Organisation.id).limit(1)) is not None:
            return None
        org = accounts.create_org(s, name=org_name, plan=plan, actor="first-start")
        password = accounts.new_password()
        user = accounts.create_user(s, email=OWNER_EMAIL, password=password, name="Owner", actor="first-start")
        accounts.add_member(s, org=org, user=user, role="owner", actor="first-start")
        _, secret = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), name="first key",
                                    actor="first-start", user_id=user.id)
        return FirstStart(OWNER_EMAIL, password, secret)
