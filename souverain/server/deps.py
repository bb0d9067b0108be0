"""Request dependencies: the API key check and the model registry."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from souverain.server.errors import APIError
from souverain.server.registry import LoadedModel, Registry


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_key(request: Request) -> str | None:
    """Bearer key against the configured ones (hashed, compared in constant time)."""
    keys: list[bytes] = request.app.state.key_digests
    if not keys:
        return None  # no key configured: an open local server
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send Authorization: Bearer <key>", type_="authentication_error")
    digest = _digest(token.strip())
    if not any(hmac.compare_digest(digest, k) for k in keys):
        raise APIError(401, "invalid API key", type_="authentication_error")
    return token


def registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


CurrentKey = Annotated[str | None, Depends(check_key)]
Models = Annotated[Registry, Depends(registry)]


def find_model(models: Registry, model_id: str) -> LoadedModel:
    found = models.get(model_id)
    if found is None:
        raise APIError(404, f"model {model_id!r} not found; see GET /v1/models", param="model", code="model_not_found")
    return found
