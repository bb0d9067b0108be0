"""Model visibility: open models for all, private ones for the organisations listed."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from souverain.db.accounts import audit
from souverain.db.tables import PrivateModel


def private_models(s: Session) -> dict[str, set[int]]:
    """model -> the organisations that may see it (models absent here are open)."""
    out: dict[str, set[int]] = {}
    for model, org in s.execute(select(PrivateModel.model, PrivateModel.org_id)):
        out.setdefault(model, set()).add(org)
    return out


def hidden_from(s: Session, *, org_id: int | None) -> frozenset[str]:
    """The private models `org_id` may not see."""
    return frozenset(m for m, orgs in private_models(s).items() if org_id not in orgs)


def share_model(s: Session, *, model: str, org_id: int, actor: str) -> None:
    """Make `model` private to its listed organisations, adding this one."""
    if s.get(PrivateModel, (model, org_id)) is None:
        s.add(PrivateModel(model=model, org_id=org_id))
    audit(s, actor=actor, action="model.private", org_id=org_id, target=model)


def open_model(s: Session, *, model: str, actor: str) -> None:
    s.execute(delete(PrivateModel).where(PrivateModel.model == model))
    audit(s, actor=actor, action="model.open", target=model)
