"""/app/api: sign in and out, the signed-in user's profile, conversations and messages; / serves the app."""

from __future__ import annotations

import html
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from souverain.db import accounts, chat
from souverain.db.database import Database
from souverain.db.tables import Conversation, Message
from souverain.server.deps import CurrentCaller, Models, PlatformDep
from souverain.server.errors import APIError
from souverain.server.platform import Caller
from souverain.web.session import COOKIE
from souverain.web.throttle import LoginThrottle

STATIC = Path(__file__).parent / "static"
router = APIRouter(prefix="/app/api", tags=["chat app"])
pages = APIRouter(include_in_schema=False)

# The page loads only its own files; inline script and event-handler attributes never run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class Login(BaseModel):
    email: str = Field(..., min_length=3, max_length=256)
    password: str = Field(..., min_length=1, max_length=1024)
    organisation: str | None = Field(None, max_length=128)


class NewConversation(BaseModel):
    model: str = Field(..., min_length=1, max_length=256)
    title: str = Field("", max_length=200)
    system_prompt: str = Field("", max_length=20_000)
    temperature: float | None = Field(None, ge=0, le=2)


class ConversationPatch(BaseModel):
    title: str | None = Field(None, max_length=200)
    model: str | None = Field(None, min_length=1, max_length=256)
    system_prompt: str | None = Field(None, max_length=20_000)
    temperature: float | None = Field(None, ge=0, le=2)
    leaf_id: str | None = Field(None, max_length=36)


class NewMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field("", max_length=1_000_000)
    parent_id: str | None = Field(None, max_length=36)
    status: Literal["complete", "streaming", "stopped", "error"] = "complete"
    model: str = Field("", max_length=256)


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field("", max_length=100_000)


class ToolCall(BaseModel):
    """A call as the API streamed it to the app (shown as "called X with ..."; the app runs no tools)."""

    id: str = Field("", max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall


class MessagePatch(BaseModel):
    content: str | None = Field(None, max_length=1_000_000)
    status: Literal["complete", "streaming", "stopped", "error"] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)


def signed_in(caller: CurrentCaller) -> Caller:
    if caller.kind != "session" or caller.user_id is None:
        raise APIError(401, "sign in first", type_="authentication_error")
    return caller


User = Annotated[Caller, Depends(signed_in)]


def conv_json(c: Conversation) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
            "temperature": c.temperature, "leaf_id": c.leaf_id, "created_at": c.created_at.isoformat() + "Z",
            "updated_at": c.updated_at.isoformat() + "Z"}


def msg_json(m: Message) -> dict[str, Any]:
    return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "status": m.status,
            "model": m.model, "tool_calls": m.tool_calls, "created_at": m.created_at.isoformat() + "Z"}


@router.post("/login")
async def login(body: Login, request: Request, response: Response, plat: PlatformDep) -> dict[str, Any]:
    """Check the password; set the session cookie (HttpOnly, SameSite=Strict). A user of several organisations
    names one with `organisation` (default: the first); the answer lists them all. Wrong passwords back off
    exponentially per account and per address (429 with Retry-After)."""
    db = plat.database("the chat app")
    throttle: LoginThrottle = request.app.state.login_throttle
    email = body.email.strip().lower()
    address = request.client.host if request.client else "-"
    throttle.enter(address, email)
    try:
        async with await throttle.hashing():
            user_id = await anyio.to_thread.run_sync(_verify, db, email, body.password)
    finally:
        throttle.leave(address)
    if user_id is None:
        throttle.failed(address, email)
        raise APIError(401, "wrong e-mail or password", type_="authentication_error")
    throttle.succeeded(email)
    token, csrf, chosen, names = await anyio.to_thread.run_sync(_open_session, db, user_id, body.organisation,
                                                                 plat.now())
    response.set_cookie(COOKIE, token, max_age=chat.SESSION_DAYS * 86400, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return {"ok": True, "csrf": csrf, "organisation": chosen, "organisations": names}


def _verify(db: Database, email: str, password: str) -> int | None:
    """The user's id when the password is right. The row is read in a read-only transaction and the hash is
    checked after it ended: argon2 never runs while a database lock is held."""
    with db.reading() as s:
        found = accounts.password_record(s, email=email)
    if not accounts.verify_password(found[1] if found else None, password) or found is None:
        return None
    if accounts.needs_rehash(found[1]):
        with db.session() as s:
            accounts.set_password(s, user=accounts.get_user(s, user_id=found[0]), password=password,
                                  actor=f"user:{found[0]}", revoke_sessions=False)
    return found[0]


def _open_session(db: Database, user_id: int, organisation: str | None, now: datetime
                  ) -> tuple[str, str, str, list[str]]:
    with db.session() as s:
        orgs = accounts.memberships(s, user=accounts.get_user(s, user_id=user_id))
        names = [o.name for o, _ in orgs]
        if not orgs:
            raise APIError(401, "wrong e-mail or password", type_="authentication_error")
        chosen = next((o for o, _ in orgs if o.name == organisation), None) if organisation else orgs[0][0]
        if chosen is None:
            raise APIError(403, f"you are not a member of {organisation!r} (yours: {', '.join(names)})",
                           type_="permission_error", param="organisation")
        token, row = chat.create_session(s, user_id=user_id, org_id=chosen.id, now=now)
        return token, row.csrf, chosen.name, names


class Acceptance(BaseModel):
    token: str = Field(..., min_length=8, max_length=128)
    password: str = Field(..., min_length=1, max_length=1024)
    name: str = Field("", max_length=128, description="the new account's display name (an existing one keeps its own)")


class PasswordChange(BaseModel):
    current: str = Field(..., min_length=1, max_length=1024)
    new: str = Field(..., min_length=8, max_length=1024)


@router.post("/invitations/accept")
async def accept_invitation(body: Acceptance, request: Request, plat: PlatformDep) -> dict[str, Any]:
    """Join the organisation an invitation names. An existing account proves itself with its password (checked
    and throttled as a sign-in); a new e-mail gets an account with this password. Then sign in as usual."""
    db = plat.database("the chat app")
    throttle: LoginThrottle = request.app.state.login_throttle
    address = request.client.host if request.client else "-"
    with db.reading() as s:
        inv = accounts.find_invitation(s, token=body.token, now=plat.now())
        email = inv.email if inv else ""
    throttle.enter(address, email or "-")
    try:
        async with await throttle.hashing():
            result = await anyio.to_thread.run_sync(_accept, db, body, plat.now())
    finally:
        throttle.leave(address)
    if result is None:
        throttle.failed(address, email or "-")
        raise APIError(401, "unknown or expired invitation, or wrong password", type_="authentication_error")
    return result


def _accept(db: Database, body: Acceptance, now: datetime) -> dict[str, Any] | None:
    with db.reading() as s:
        inv = accounts.find_invitation(s, token=body.token, now=now)
        found = accounts.password_record(s, email=inv.email) if inv else None
    # The same argon2 work in every case: timing tells neither whether the invitation nor the account exists.
    right = accounts.verify_password(found[1] if found else None, body.password)
    if inv is None or (found is not None and not right):
        return None
    with db.session() as s:
        inv = accounts.find_invitation(s, token=body.token, now=now)
        if inv is None:
            return None
        user = (accounts.get_user(s, user_id=found[0]) if found else
                accounts.create_user(s, email=inv.email, password=body.password, name=body.name,
                                     actor="invitation", org_id=inv.org_id))
        org = accounts.get_org(s, org_id=inv.org_id)
        m = accounts.accept(s, invitation=inv, user=user)
        return {"ok": True, "organisation": org.name, "role": m.role, "email": user.email}


@router.post("/password")
async def change_password(body: PasswordChange, request: Request, response: Response, caller: User,
                          plat: PlatformDep) -> dict[str, Any]:
    """A new password: every session of the user ends, this browser gets a fresh one."""
    assert caller.user_id is not None and caller.org_id is not None
    db = plat.database("the chat app")
    user_id, org_id = caller.user_id, caller.org_id

    def change() -> tuple[str, str] | None:
        with db.reading() as s:
            old_hash = accounts.get_user(s, user_id=user_id).password_hash
        if not accounts.verify_password(old_hash, body.current):
            return None
        with db.session() as s:
            accounts.set_password(s, user=accounts.get_user(s, user_id=user_id), password=body.new,
                                  actor=f"user:{user_id}")
            token, row = chat.create_session(s, user_id=user_id, org_id=org_id, now=plat.now())
            return token, row.csrf

    async with await request.app.state.login_throttle.hashing():
        done = await anyio.to_thread.run_sync(change)
    if done is None:
        raise APIError(403, "the current password is wrong", type_="permission_error", param="current")
    response.set_cookie(COOKIE, done[0], max_age=chat.SESSION_DAYS * 86400, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return {"ok": True, "csrf": done[1]}


@router.post("/logout")
def logout(request: Request, response: Response, _: User, plat: PlatformDep) -> dict[str, Any]:
    with plat.database("the chat app").session() as s:
        chat.end_session(s, token=request.cookies.get(COOKIE, ""))
    response.delete_cookie(COOKIE, path="/")
    return {"ok": True}


@router.get("/me")
def me(request: Request, caller: User, plat: PlatformDep, models: Models) -> dict[str, Any]:
    """The signed-in user, their organisation's plan and usage, the models they may use, and the CSRF token."""
    assert caller.user_id is not None and caller.org_id is not None and caller.limits is not None
    with plat.database("the chat app").reading() as s:
        user = accounts.get_user(s, user_id=caller.user_id)
        org = accounts.get_org(s, org_id=caller.org_id)
        row = chat.get_session(s, token=request.cookies.get(COOKIE, ""), now=plat.now())
        csrf = row.csrf if row else ""
        names = [o.name for o, _ in accounts.memberships(s, user=user)]
    lim = caller.limits
    if models.refresh is not None:
        models.refresh()  # fine-tuned models finished since the last look
    usable = [m for m in plat.visible(caller, [*sorted(models.models), *sorted(models.adapters)])
              if lim.allowed_models is None or m in lim.allowed_models]
    return {"email": user.email, "name": user.name, "organisation": org.name, "role": caller.role,
            "plan": lim.plan, "month_tokens": caller.month_tokens,
            "limits": {"tokens_per_month": lim.tokens_per_month, "tokens_per_minute": lim.tokens_per_minute,
                       "requests_per_second": lim.requests_per_second, "max_context": lim.max_context},
            "models": usable, "csrf": csrf, "organisations": names}


class Switch(BaseModel):
    organisation: str = Field(..., min_length=1, max_length=128)


@router.post("/switch")
def switch_organisation(body: Switch, request: Request, response: Response, caller: User, plat: PlatformDep
                        ) -> dict[str, Any]:
    """Act in another organisation the user belongs to: this session ends, a new one starts there."""
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        orgs = accounts.memberships(s, user=accounts.get_user(s, user_id=caller.user_id))
        chosen = next((o for o, _ in orgs if o.name == body.organisation), None)
        if chosen is None:
            raise APIError(403, f"you are not a member of {body.organisation!r}", type_="permission_error",
                           param="organisation")
        chat.end_session(s, token=request.cookies.get(COOKIE, ""))
        token, row = chat.create_session(s, user_id=caller.user_id, org_id=chosen.id, now=plat.now())
        csrf = row.csrf
    response.set_cookie(COOKIE, token, max_age=chat.SESSION_DAYS * 86400, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return {"ok": True, "csrf": csrf, "organisation": chosen.name}


@router.get("/conversations")
def list_conversations(caller: User, plat: PlatformDep, q: Annotated[str, Query(max_length=200)] = ""
                       ) -> dict[str, Any]:
    """Newest first; `q` searches titles and message text."""
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        return {"data": [conv_json(c) for c in chat.list_conversations(s, user_id=caller.user_id, query=q.strip())]}


@router.post("/conversations", status_code=201)
def create_conversation(body: NewConversation, caller: User, plat: PlatformDep) -> dict[str, Any]:
    assert caller.user_id is not None and caller.org_id is not None
    with plat.database("the chat app").session() as s:
        c = chat.create_conversation(s, user_id=caller.user_id, org_id=caller.org_id, model=body.model,
                                     title=body.title, system_prompt=body.system_prompt,
                                     temperature=body.temperature)
        return conv_json(c)


@router.get("/conversations/{cid}")
def get_conversation(cid: str, caller: User, plat: PlatformDep) -> dict[str, Any]:
    """The conversation with every message (all branches) and the visible thread's ids."""
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        c = chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid)
        msgs = chat.messages(s, conv=c)
        return {**conv_json(c), "messages": [msg_json(m) for m in msgs],
                "thread": [m.id for m in chat.branch(msgs, c.leaf_id)]}


@router.get("/conversations/{cid}/export")
def export_conversation(cid: str, caller: User, plat: PlatformDep,
                        fmt: Annotated[str, Query(alias="format")] = "md") -> Response:
    """The visible thread as a download: Markdown (to read or paste) or JSON (every message, all branches)."""
    assert caller.user_id is not None
    if fmt not in ("md", "json"):
        raise APIError(400, f"format must be md or json, not {fmt!r}", param="format")
    with plat.database("the chat app").session() as s:
        c = chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid)
        msgs = chat.messages(s, conv=c)
        thread = chat.branch(msgs, c.leaf_id)
        data = {**conv_json(c), "messages": [msg_json(m) for m in msgs], "thread": [m.id for m in thread]}
        text = json.dumps(data, indent=2, ensure_ascii=False) if fmt == "json" else _markdown(c, thread)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", c.title or "conversation").strip("-")[:60] or "conversation"
    return Response(text, media_type="application/json" if fmt == "json" else "text/markdown; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{stem}.{fmt}"',
                             "Cache-Control": "no-store"})


def _markdown(c: Conversation, thread: list[Message]) -> str:
    lines = [f"# {c.title or 'Conversation'}", "",
             f"*{c.model} · {c.created_at.isoformat(timespec='minutes')}Z*", ""]
    if c.system_prompt:
        lines += ["**System**", "", c.system_prompt, ""]
    for m in thread:
        who = "You" if m.role == "user" else (m.model or "Assistant") if m.role == "assistant" else m.role.title()
        lines += [f"**{who}**", "", m.content or "", ""]
        for call in m.tool_calls or []:
            fn = call.get("function", {})
            lines += [f"> called `{fn.get('name')}` with `{fn.get('arguments')}`", ""]
    return "\n".join(lines)


@router.patch("/conversations/{cid}")
def update_conversation(cid: str, body: ConversationPatch, caller: User, plat: PlatformDep) -> dict[str, Any]:
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        c = chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid)
        for name, value in body.model_dump(exclude_unset=True).items():
            setattr(c, name, value.strip() if name == "title" and value else value)
        return conv_json(c)


@router.delete("/conversations/{cid}")
def delete_conversation(cid: str, caller: User, plat: PlatformDep) -> dict[str, Any]:
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        chat.delete_conversation(s, conv=chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid))
    return {"id": cid, "deleted": True}


@router.post("/conversations/{cid}/messages", status_code=201)
def add_message(cid: str, body: NewMessage, caller: User, plat: PlatformDep) -> dict[str, Any]:
    """Save a message (the user's is saved before generation starts); a parent with children makes a branch."""
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        c = chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid)
        m = chat.add_message(s, conv=c, role=body.role, content=body.content, parent_id=body.parent_id,
                             status=body.status, model=body.model)
        return msg_json(m)


@router.patch("/conversations/{cid}/messages/{mid}")
def update_message(cid: str, mid: str, body: MessagePatch, caller: User, plat: PlatformDep) -> dict[str, Any]:
    """Save a streaming answer as far as it got, and its final status."""
    assert caller.user_id is not None
    with plat.database("the chat app").session() as s:
        c = chat.get_conversation(s, user_id=caller.user_id, conversation_id=cid)
        calls = [t.model_dump() for t in body.tool_calls] if body.tool_calls is not None else None
        return msg_json(chat.update_message(s, conv=c, message_id=mid, content=body.content, status=body.status,
                                            tool_calls=calls))


def _page(request: Request) -> HTMLResponse:
    """The app's one page. Behind `--root-path` its links and calls carry the proxy's prefix (read by app.js)."""
    root = request.scope.get("root_path", "")
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    page = page.replace('"/static/', f'"{html.escape(root)}/static/').replace(
        '<meta name="root-path" content="">', f'<meta name="root-path" content="{html.escape(root)}">')
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@pages.get("/")
def index(request: Request) -> HTMLResponse:
    return _page(request)


@pages.get("/favicon.ico")
def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})


@pages.get("/c/{cid}")
def conversation_page(cid: str, request: Request) -> HTMLResponse:
    return _page(request)
