"""Browser sessions: an HttpOnly, SameSite=Strict cookie; state-changing requests also need the CSRF header.

A signed-in browser calls the platform API (/v1/...) with its cookie instead of an API key, so no key ever
reaches the page's JavaScript; it acts as its user in the organisation's default workspace, with that plan.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from souverain.db import accounts, chat, usage
from souverain.db import models as model_access
from souverain.server.errors import APIError
from souverain.server.platform import Caller, Limits, Platform

COOKIE = "sv_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def session_caller(platform: Platform) -> Callable[[Request], Caller | None]:
    def resolve(request: Request) -> Caller | None:
        token = request.cookies.get(COOKIE)
        if not token or platform.db is None:
            return None
        with platform.db.reading() as s:
            row = chat.get_session(s, token=token, now=platform.now())
            if row is None:
                return None
            if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != row.csrf:
                raise APIError(403, "missing or wrong CSRF token (header x-csrf-token)", type_="permission_error")
            org = accounts.get_org(s, org_id=row.org_id)
            workspace = accounts.get_workspace(s, org=org)
            return Caller("session", org.id, workspace.id, None, row.user_id,
                          accounts.role_in(s, user_id=row.user_id, org_id=org.id),
                          Limits.of(accounts.org_plan(s, org_id=org.id)), None,
                          usage.month_tokens(s, org_id=org.id, at=platform.now()),
                          model_access.hidden_from(s, org_id=org.id))

    return resolve
