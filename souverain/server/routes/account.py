"""GET /v1/account: the caller's organisation, plan, limits and this month's usage (the chat app shows it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from souverain.db import accounts
from souverain.server.deps import CurrentCaller, PlatformDep

router = APIRouter()


@router.get("/v1/account")
def account(caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    """Who the key (or session) belongs to, and what its plan allows."""
    out: dict[str, Any] = {"object": "account", "kind": caller.kind, "role": caller.role, "organisation": None,
                           "plan": None, "month_tokens": caller.month_tokens, "limits": None}
    if caller.limits is not None and plat.db is not None and caller.org_id is not None:
        with plat.db.session() as s:
            out["organisation"] = accounts.get_org(s, org_id=caller.org_id).name
        lim = caller.limits
        out["plan"] = lim.plan
        out["limits"] = {"requests_per_second": lim.requests_per_second, "tokens_per_minute": lim.tokens_per_minute,
                         "tokens_per_month": lim.tokens_per_month, "allowed_models": lim.allowed_models,
                         "max_context": lim.max_context}
    return out
