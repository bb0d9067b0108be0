"""The ASGI layer in front of every route: request ids, body limits enforced as bytes arrive, and API
authentication before a body is read.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware): it sees each body chunk as it arrives, so a
chunked upload over the limit is refused at the limit, not after it was read whole, and a request to the API
without valid credentials is answered 401 before its first body byte is read.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from souverain.server.errors import APIError, error_body
from souverain.server.platform import Caller, Platform

CALLER = "souverain.caller"  # where the middleware leaves the authenticated caller, in scope["state"]
PUBLIC = ("/app/api/login", "/app/api/invitations/accept")  # the chat app's routes that need no session


@dataclass
class Guard:
    app: ASGIApp
    platform: Platform
    limit_for: Callable[[str], int]  # path -> largest body accepted, in bytes
    session_cookie: str = "sv_session"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        limit = self.limit_for(route_path(scope))
        size = _header(scope, b"content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            await _answer(scope, receive, send_with_id, APIError(413, f"request body over the limit of {limit} bytes"))
            return
        try:
            await self._authenticate(scope)
        except APIError as e:
            await _answer(scope, receive, send_with_id, e)
            return
        await self._within_limit(scope, receive, send_with_id, limit)

    async def _authenticate(self, scope: Scope) -> None:
        """API routes: the bearer key is checked here, in a worker thread, before the body; no credentials
        at all is a 401 at once. The route's dependency reuses the caller found here. The chat app's routes
        (but sign-in and accepting an invitation) need the session cookie before their body is read."""
        path = route_path(scope)
        if path.startswith("/app/api/") and path not in PUBLIC and not self.platform.open:
            if self.session_cookie.encode() + b"=" not in (_header(scope, b"cookie") or "").encode():
                raise APIError(401, "sign in first", type_="authentication_error")
            return
        if not path.startswith("/v1/") or self.platform.open:
            return
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if not header:
            if self.session_cookie.encode() + b"=" in (_header(scope, b"cookie") or "").encode():
                return  # the chat app: its session (and CSRF header) is checked by the route's dependency
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", type_="authentication_error")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "use Authorization: Bearer <key>", type_="authentication_error")
        caller: Caller = await anyio.to_thread.run_sync(self.platform.authenticate, token.strip())
        scope.setdefault("state", {})[CALLER] = caller

    async def _within_limit(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app; a body that grows past `limit` (chunked, or longer than announced) ends the read there
        and the answer is 413, whatever the app was about to say."""
        received = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a cut-off body is replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await JSONResponse(error_body(f"request body over the limit of {limit} bytes", "invalid_request_error"),
                               413, headers={"Connection": "close"})(scope, receive, send)


async def _answer(scope: Scope, receive: Receive, send: Send, e: APIError) -> None:
    # Connection: close: the unread body is not drained, the connection ends with the answer.
    response = JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status,
                            headers={**e.headers, "Connection": "close"})
    await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def route_path(scope: Scope) -> str:
    """The path the routes see: behind `--root-path` the server hears `/prefix/v1/...` (uvicorn puts the prefix
    back in front); authentication and limits must judge `/v1/...`, as the router does."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def caller_from(scope: MutableMapping[str, Any]) -> Caller | None:
    found = scope.get("state", {}).get(CALLER)
    return found if isinstance(found, Caller) else None
