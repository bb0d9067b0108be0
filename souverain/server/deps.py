"""Request dependencies: the caller (API key or session), the platform and the model registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from souverain.server.errors import APIError
from souverain.server.guard import caller_from
from souverain.server.platform import Caller, Platform
from souverain.server.registry import LoadedModel, Registry


def platform(request: Request) -> Platform:
    return request.app.state.platform  # type: ignore[no-any-return]


def current_caller(request: Request) -> Caller:
    """The bearer key's caller (401 when missing or invalid; a server without keys is open)."""
    found = caller_from(request.scope)  # authenticated by the Guard before the body was read
    if found is not None:
        return found
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    session = getattr(request.app.state, "session_caller", None)
    if not token and session is not None:  # the chat app: a signed-in browser, checked for CSRF
        caller: Caller | None = session(request)
        if caller is not None:
            return caller
    if token and scheme.lower() != "bearer":
        raise APIError(401, "use Authorization: Bearer <key>", type_="authentication_error")
    return platform(request).authenticate(token.strip() or None)


def registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


CurrentCaller = Annotated[Caller, Depends(current_caller)]
Models = Annotated[Registry, Depends(registry)]
PlatformDep = Annotated[Platform, Depends(platform)]


def find_model(models: Registry, model_id: str, caller: Caller | None = None, plat: Platform | None = None
               ) -> LoadedModel:
    found = models.get(model_id)  # an alias (--served-model-name) is checked as the model it names
    if found is None or (caller is not None and plat is not None and not plat.visible(caller, [found.id])):
        raise APIError(404, f"model {model_id!r} not found; see GET /v1/models", param="model", code="model_not_found")
    return found
