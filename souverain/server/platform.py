"""Who is calling, and what they may do: keys, plans, private models, rate limits, quotas and fair shares.

The request path reads the database once, in a worker thread, to authenticate (key, plan, role, the month's
tokens and the private models it may not see, in one read-only transaction); admission (`gate`, `charge`,
`hold`) is in memory; usage is written by the ledger (`metering.py`), ahead of what a stream sends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from souverain.db import accounts, keys, usage
from souverain.db import models as model_access
from souverain.db.database import Database
from souverain.db.tables import Plan, utcnow
from souverain.server.errors import APIError
from souverain.server.limits import Rate, RateLimiter
from souverain.server.metering import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """A plan's limits as the request path reads them."""

    plan: str
    requests_per_second: float | None = None
    tokens_per_minute: int | None = None
    tokens_per_month: int | None = None
    allowed_models: tuple[str, ...] | None = None
    max_context: int | None = None
    priority: int = 0
    max_concurrent: int | None = None  # sequences of the organisation running at once
    max_queued: int | None = None  # sequences waiting beyond those
    finetune: dict[str, int | None] = field(default_factory=dict)  # seq_len, batch, steps, file_bytes, jobs
    cache_per_user: bool = False  # prefix cache shared per user (or key) rather than per organisation

    @classmethod
    def of(cls, p: Plan) -> Limits:
        return cls(p.name, p.requests_per_second, p.tokens_per_minute, p.tokens_per_month,
                   tuple(p.allowed_models) if p.allowed_models is not None else None, p.max_context, p.priority,
                   p.max_concurrent, p.max_queued,
                   {k: getattr(p, f"finetune_max_{k}") for k in ("seq_len", "batch", "steps", "file_bytes", "jobs")},
                   bool(p.cache_per_user))


@dataclass(frozen=True)
class Caller:
    """The principal behind a request. `root` (a static key, or a server without keys) is not metered."""

    kind: str  # open | static | key | session
    org_id: int | None = None
    workspace_id: int | None = None
    key_id: int | None = None
    user_id: int | None = None
    role: str | None = None
    limits: Limits | None = None
    key: keys.KeyRecord | None = None
    month_tokens: int = 0
    hidden: frozenset[str] = frozenset()  # private models not shared with this organisation (read with the key)

    def usage(self, request_id: str, model: str, endpoint: str, prompt_tokens: int, completion_tokens: int,
              latency_ms: int, status: str) -> usage.Usage:
        return usage.Usage(request_id, model, endpoint, prompt_tokens, completion_tokens, latency_ms, status,
                           self.org_id, self.workspace_id, self.key_id, self.user_id)

    @property
    def root(self) -> bool:
        return self.kind in ("open", "static")

    @property
    def is_admin(self) -> bool:
        return self.root or self.role in ("owner", "admin")

    def rates(self) -> list[Rate]:
        if self.limits is None:
            return []
        out = []
        if self.key is not None:
            out.append(Rate(f"key:{self.key.id}", self.key.requests_per_second or self.limits.requests_per_second,
                            self.key.tokens_per_minute or self.limits.tokens_per_minute))
        if self.workspace_id is not None:
            out.append(Rate(f"workspace:{self.workspace_id}", self.limits.requests_per_second,
                            self.limits.tokens_per_minute))
        return out


@dataclass(frozen=True)
class Admission:
    headers: dict[str, str]
    priority: int = 0
    max_context: int | None = None
    cache_salt: str = ""
    tenant: str = ""  # the engine shares fairly between tenants
    max_running: int | None = None


@dataclass
class Platform:
    db: Database | None
    static_digests: list[str] = field(default_factory=list)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    now: Callable[[], datetime] = utcnow
    stale_after: float = 60.0  # seconds without progress after which a running usage row is a dead server's
    _ledger: Ledger | None = None
    _inflight: dict[int, int] = field(default_factory=dict)  # organisation -> sequences running or queued
    _inflight_lock: threading.Lock = field(default_factory=threading.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def database(self, what: str) -> Database:
        """The platform database, or 404 naming the feature (`what`) that needs it."""
        if self.db is None:
            raise APIError(404, f"{what} need the platform database (start the server with --db)",
                           code="no_database")
        return self.db

    @property
    def open(self) -> bool:
        return self.db is None and not self.static_digests

    def authenticate(self, token: str | None) -> Caller:
        """The caller for a bearer token; raises 401 for a missing, unknown, revoked or expired key."""
        if self.open:
            return Caller("open")
        if not token:
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", type_="authentication_error")
        digest = keys.digest(token)
        if any(secrets.compare_digest(digest, d) for d in self.static_digests):
            return Caller("static")
        if self.db is None:
            raise APIError(401, "invalid API key", type_="authentication_error")
        now = self.now()
        with self.db.reading() as s:
            rec = keys.authenticate(s, key=token, now=now)
            if rec is None or (rec.user_id is not None and accounts.get_user(s, user_id=rec.user_id).disabled):
                raise APIError(401, "invalid, revoked or expired API key", type_="authentication_error")
            plan = accounts.org_plan(s, org_id=rec.org_id)
            caller = Caller("key", rec.org_id, rec.workspace_id, rec.id, rec.user_id,
                            accounts.role_in(s, user_id=rec.user_id, org_id=rec.org_id), Limits.of(plan), rec,
                            usage.month_tokens(s, org_id=rec.org_id, at=now),
                            model_access.hidden_from(s, org_id=rec.org_id))
        if keys.stale_use(rec, now):  # a small write now and then, never inside the read
            try:
                with self.db.session() as s:
                    keys.touch(s, key_id=rec.id, now=now)
            except Exception:
                log.warning("could not record the use of key %s", rec.id, exc_info=True)
        return caller

    def visible(self, caller: Caller, model_ids: list[str]) -> list[str]:
        """The models this caller may see: open ones, and private ones shared with its organisation. (Read
        with the caller, in a worker thread: nothing here touches the database on the event loop.)"""
        return model_ids if caller.root else [m for m in model_ids if m not in caller.hidden]

    def check_model(self, caller: Caller, model: str) -> None:
        """403 for a model the plan or the key excludes. (Visibility, 404, is checked when the route looks the
        model up: `find_model`, or `visible` for embedders; not twice per request.)"""
        if caller.root:
            return
        for allowed, what in ((caller.limits.allowed_models if caller.limits else None, "your plan"),
                              (caller.key.allowed_models if caller.key else None, "this API key")):
            if allowed is not None and model not in allowed:
                raise APIError(403, f"{what} does not include model {model!r} (allowed: {', '.join(allowed)})",
                               type_="permission_error", param="model", code="model_not_allowed")

    def gate(self, caller: Caller, model: str) -> Admission:
        """Model allow-lists, the monthly quota, then one request from the rate limits; 429 with the headers
        clients act on. Cheap and database-free: it runs before a prompt is rendered or tokenised."""
        self.check_model(caller, model)
        lim = caller.limits
        if lim is None:
            return Admission({})
        quota = lim.tokens_per_month
        if quota is not None and caller.month_tokens >= quota:
            raise APIError(429, f"monthly token quota of the {lim.plan!r} plan is used up ({caller.month_tokens} of "
                                f"{quota} tokens); it renews on the 1st, or upgrade the plan",
                           type_="rate_limit_error", code="quota_exceeded",
                           headers={"x-should-retry": "false", "x-ratelimit-limit-tokens-month": str(quota),
                                    "x-ratelimit-remaining-tokens-month": "0"})
        verdict = self.limiter.admit(caller.rates(), 0)
        if verdict.retry_after > 0:
            raise APIError(429, f"rate limit of the {lim.plan!r} plan reached; retry in "
                                f"{verdict.headers['Retry-After']} s", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers=verdict.headers)
        headers = dict(verdict.headers)
        if quota is not None:
            headers["x-ratelimit-limit-tokens-month"] = str(quota)
            headers["x-ratelimit-remaining-tokens-month"] = str(max(0, quota - caller.month_tokens))
        salt = f"org:{caller.org_id}"
        if lim.cache_per_user:
            salt += f":user:{caller.user_id}" if caller.user_id is not None else f":key:{caller.key_id}"
        return Admission(headers, lim.priority, lim.max_context, salt, f"org:{caller.org_id}", lim.max_concurrent)

    def charge(self, caller: Caller, tokens: int) -> None:
        """Take tokens from the caller's token-per-minute buckets (negative: give them back)."""
        if caller.limits is not None and tokens:
            self.limiter.charge(caller.rates(), tokens)

    def hold(self, caller: Caller, sequences: int) -> Callable[[], None]:
        """Count `sequences` against the organisation's running + queued allowance; 429 past it. Returns the
        release to call when they end."""
        lim = caller.limits
        if lim is None or caller.org_id is None or lim.max_queued is None:
            return lambda: None  # no queue cap: the running cap alone, which the engine enforces
        allowed = (lim.max_concurrent or 0) + lim.max_queued
        if sequences > allowed:  # never admissible: retrying would not help
            raise APIError(400, f"n = {sequences} exceeds the {lim.plan!r} plan's {allowed} sequences at once",
                           param="n", code="plan_limit")
        org = caller.org_id
        with self._inflight_lock:
            have = self._inflight.get(org, 0)
            if have + sequences > allowed:
                raise APIError(429, f"your organisation has {have} sequences running or queued; the {lim.plan!r} "
                                    f"plan allows {allowed} ({lim.max_concurrent} running, {lim.max_queued} queued); "
                                    "retry when some finish", type_="rate_limit_error", code="org_queue_full",
                               headers={"Retry-After": "1", "x-should-retry": "true"})
            self._inflight[org] = have + sequences
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            with self._inflight_lock:
                left = self._inflight.get(org, 0) - sequences
                if left > 0:
                    self._inflight[org] = left
                else:
                    self._inflight.pop(org, None)

        return release

    def ledger_for(self, caller: Caller) -> Ledger | None:
        """The usage writer, or None where nothing is metered (operator keys, no database)."""
        if self.db is None or caller.root:
            return None
        return self.ledger()

    def ledger(self) -> Ledger | None:
        if self._ledger is None and self.db is not None:
            self._ledger = Ledger(self.db, self.now, stale_after=self.stale_after)
        return self._ledger

    def settle_stale(self) -> int:
        """At start-up: usage rows left `running` by servers that died become `interrupted` (their tokens were
        billed as they were written). Returns how many."""
        ledger = self.ledger()
        return ledger.settle_stale() if ledger is not None else 0

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` to its end even though the request that started it is gone (billing a cancelled one)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self) -> None:
        if self._ledger is not None:
            self._ledger.shutdown()

    def record_now(self, caller: Caller, u: usage.Usage) -> None:
        """Meter a one-shot request (its tokens were charged at admission): the usage row, committed on return."""
        if self.db is None or caller.root:
            return
        with self.db.session() as s:
            usage.record(s, usage=u, at=self.now())

    async def record(self, caller: Caller, u: usage.Usage) -> None:
        # In a worker thread, shielded: a client that goes away must not cancel the write of its own usage.
        await asyncio.shield(asyncio.to_thread(self.record_now, caller, u))
