"""The chat app's storage: browser sessions, conversations and their messages (a tree: edits branch)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from souverain.db.errors import Conflict, NotFound
from souverain.db.tables import Conversation, Message, WebSession, utcnow

SESSION_DAYS = 14
STATUSES = ("complete", "streaming", "stopped", "error")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(s: Session, *, user_id: int, org_id: int, now: datetime | None = None) -> tuple[str, WebSession]:
    """(cookie token, row): the token is returned once; the row keeps its hash and a CSRF token."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    row = WebSession(digest=_digest(token), user_id=user_id, org_id=org_id, csrf=secrets.token_urlsafe(24),
                     created_at=now, expires_at=now + timedelta(days=SESSION_DAYS))
    s.add(row)
    s.flush()
    return token, row


def get_session(s: Session, *, token: str, now: datetime | None = None) -> WebSession | None:
    row = s.scalar(select(WebSession).where(WebSession.digest == _digest(token)))
    if row is None or row.expires_at <= (now or utcnow()):
        return None
    return row


def end_session(s: Session, *, token: str) -> None:
    s.execute(delete(WebSession).where(WebSession.digest == _digest(token)))


def list_conversations(s: Session, *, user_id: int, query: str = "", limit: int = 200) -> list[Conversation]:
    """Newest first; `query` matches titles and message text (case-insensitive)."""
    q = select(Conversation).where(Conversation.user_id == user_id)
    if query:
        like = f"%{query.lower()}%"
        in_text = select(Message.conversation_id).where(Message.content.ilike(like))
        q = q.where(or_(Conversation.title.ilike(like), Conversation.id.in_(in_text)))
    return list(s.scalars(q.order_by(Conversation.updated_at.desc()).limit(limit)))


def create_conversation(s: Session, *, user_id: int, org_id: int, model: str, title: str = "",
                        system_prompt: str = "", temperature: float | None = None) -> Conversation:
    conv = Conversation(id=str(uuid.uuid4()), user_id=user_id, org_id=org_id, model=model, title=title,
                        system_prompt=system_prompt, temperature=temperature)
    s.add(conv)
    s.flush()
    return conv


def get_conversation(s: Session, *, user_id: int, conversation_id: str) -> Conversation:
    conv = s.get(Conversation, conversation_id)
    if conv is None or conv.user_id != user_id:  # another user's conversation does not exist for you
        raise NotFound(f"no conversation {conversation_id!r}")
    return conv


def delete_conversation(s: Session, *, conv: Conversation) -> None:
    s.execute(delete(Message).where(Message.conversation_id == conv.id))
    s.delete(conv)


def messages(s: Session, *, conv: Conversation) -> list[Message]:
    return list(s.scalars(select(Message).where(Message.conversation_id == conv.id)
                          .order_by(Message.created_at, Message.id)))


def branch(all_messages: list[Message], leaf_id: str | None) -> list[Message]:
    """The visible thread: from the root down to `leaf_id` (or to the newest leaf)."""
    by_id = {m.id: m for m in all_messages}
    if leaf_id not in by_id:
        if not all_messages:
            return []
        leaf_id = all_messages[-1].id
    path: list[Message] = []
    cur: Message | None = by_id[leaf_id]  # type: ignore[index]
    while cur is not None:
        path.append(cur)
        cur = by_id.get(cur.parent_id) if cur.parent_id else None
    return path[::-1]


def add_message(s: Session, *, conv: Conversation, role: str, content: str, parent_id: str | None,
                status: str = "complete", model: str = "") -> Message:
    """Append (or branch: a parent that already has children gets a sibling); the new message becomes the leaf."""
    if role not in ("user", "assistant"):
        raise Conflict("role must be user or assistant")
    if status not in STATUSES:
        raise Conflict(f"status must be one of {', '.join(STATUSES)}")
    if parent_id is not None:
        parent = s.get(Message, parent_id)
        if parent is None or parent.conversation_id != conv.id:
            raise NotFound(f"no message {parent_id!r} in this conversation")
    now = utcnow()
    msg = Message(id=str(uuid.uuid4()), conversation_id=conv.id, parent_id=parent_id, role=role, content=content,
                  status=status, model=model, created_at=now, updated_at=now)
    s.add(msg)
    conv.leaf_id = msg.id
    conv.updated_at = now
    s.flush()
    return msg


def update_message(s: Session, *, conv: Conversation, message_id: str, content: str | None = None,
                   status: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> Message:
    msg = s.get(Message, message_id)
    if msg is None or msg.conversation_id != conv.id:
        raise NotFound(f"no message {message_id!r} in this conversation")
    if status is not None and status not in STATUSES:
        raise Conflict(f"status must be one of {', '.join(STATUSES)}")
    if content is not None:
        msg.content = content
    if status is not None:
        msg.status = status
    if tool_calls is not None:
        msg.tool_calls = tool_calls
    msg.updated_at = conv.updated_at = utcnow()
    return msg
