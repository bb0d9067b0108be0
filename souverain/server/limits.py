"""Token buckets for requests/s and tokens/min, per key and per workspace. Pure Python; the clock is injected.

Buckets live in the server process: with several processes each enforces its own share of the rate, while the
monthly quota (read from the database) holds across all of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.per_second)
        self.at = now

    def wait(self, need: float) -> float:
        """Seconds until `need` is available (0 when it is now)."""
        return 0.0 if self.level >= need else (need - self.level) / self.per_second

    def reset_in(self) -> float:
        return (self.capacity - self.level) / self.per_second


@dataclass(frozen=True)
class Rate:
    """A limit for one scope: None means unlimited."""

    scope: str  # "key:12", "workspace:3"
    requests_per_second: float | None
    tokens_per_minute: int | None


@dataclass
class Verdict:
    retry_after: float  # 0 when admitted
    headers: dict[str, str]


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:.0f}s"


@dataclass
class RateLimiter:
    clock: Callable[[], float] = time.monotonic
    buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _bucket(self, scope: str, kind: str, capacity: float, per_second: float, now: float) -> Bucket:
        b = self.buckets.get((scope, kind))
        if b is None or b.capacity != capacity or b.per_second != per_second:  # new, or the plan changed
            b = self.buckets[(scope, kind)] = Bucket(capacity, per_second, capacity, now)
        b.refill(now)
        return b

    def admit(self, rates: list[Rate], prompt_tokens: int) -> Verdict:
        """Take one request and the prompt's tokens from every scope, or none of them when any is short.

        A request needs a whole request token and at least one token of balance; its tokens may then take the
        balance below zero (the answer's length is not known in advance), which delays the next requests.
        """
        with self.lock:
            now = self.clock()
            pairs = []
            for r in rates:
                req = (self._bucket(r.scope, "requests", max(r.requests_per_second, 1.0), r.requests_per_second, now)
                       if r.requests_per_second else None)
                tok = (self._bucket(r.scope, "tokens", float(r.tokens_per_minute), r.tokens_per_minute / 60.0, now)
                       if r.tokens_per_minute else None)
                pairs.append((req, tok))
            wait = max([0.0] + [b.wait(1.0) for b, _ in pairs if b] + [t.wait(1.0) for _, t in pairs if t])
            if wait == 0.0:
                for req, tok in pairs:
                    if req:
                        req.level -= 1.0
                    if tok:
                        tok.level -= prompt_tokens
            return Verdict(wait, self._headers(pairs, wait))

    def charge(self, rates: list[Rate], tokens: int) -> None:
        """Debit the answer's tokens once it is known."""
        with self.lock:
            now = self.clock()
            for r in rates:
                if r.tokens_per_minute:
                    self._bucket(r.scope, "tokens", float(r.tokens_per_minute), r.tokens_per_minute / 60.0,
                                 now).level -= tokens

    @staticmethod
    def _headers(pairs: list[tuple[Bucket | None, Bucket | None]], wait: float) -> dict[str, str]:
        h: dict[str, str] = {}
        reqs = [b for b, _ in pairs if b]
        toks = [t for _, t in pairs if t]
        if reqs:
            tight = min(reqs, key=lambda b: b.level)
            h |= {"x-ratelimit-limit-requests": f"{min(b.per_second for b in reqs):g}/s",
                  "x-ratelimit-remaining-requests": str(max(0, math.floor(tight.level))),
                  "x-ratelimit-reset-requests": _duration(tight.reset_in())}
        if toks:
            tight = min(toks, key=lambda b: b.level)
            h |= {"x-ratelimit-limit-tokens": str(int(min(b.capacity for b in toks))),
                  "x-ratelimit-remaining-tokens": str(max(0, math.floor(tight.level))),
                  "x-ratelimit-reset-tokens": _duration(tight.reset_in())}
        if wait > 0:
            h["Retry-After"] = str(max(1, math.ceil(wait)))
            h["x-should-retry"] = "true"
        return h
