"""Sign-in throttling: exponential back-off per account and per address, and a bound on password checks.

argon2id is meant to be expensive (tens of milliseconds and 64 MiB each), so a flood of wrong passwords must
neither take the CPU from generation nor pile up threads: each address may have a few checks under way, the
whole server `max_hashing` at once with at most `max_waiting` more queued; past that the answer is 429 at once.
After `free_failures` wrong passwords an account (`free_failures_address` for an address) must wait `base`
seconds, doubling with each further failure up to `cap`; a success clears the account's count. State is per
server process, in memory.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from souverain.server.errors import APIError


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


@dataclass
class LoginThrottle:
    clock: Callable[[], float] = time.monotonic
    free_failures: int = 5  # per account
    free_failures_address: int = 20  # per address (offices share one)
    base: float = 1.0
    cap: float = 900.0
    per_address: int = 4  # password checks under way from one address
    max_hashing: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))  # half the cores at most
    max_waiting: int = 16
    max_records: int = 100_000  # memory bound: expired records are dropped past this
    _records: dict[str, _Record] = field(default_factory=dict)
    _in_flight: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _hashing: asyncio.Semaphore | None = None
    _queued: int = 0

    def enter(self, address: str, email: str) -> None:
        """Before a password check: 429 (Retry-After) while the account or address is backing off, or when
        too many checks are under way."""
        now = self.clock()
        with self._lock:
            wait = max((r.locked_until - now for k in (f"ip:{address}", f"email:{email}")
                        if (r := self._records.get(k)) is not None), default=0.0)
            if wait > 0:
                raise _too_many(f"too many failed sign-ins; retry in {math.ceil(wait)} s", wait)
            if self._in_flight[address] >= self.per_address or self._queued >= self.max_waiting:
                raise _too_many("too many sign-ins under way; retry shortly", 1.0)
            self._in_flight[address] += 1
            self._queued += 1

    def leave(self, address: str) -> None:
        with self._lock:
            self._in_flight[address] -= 1
            if self._in_flight[address] <= 0:
                del self._in_flight[address]
            self._queued -= 1

    async def hashing(self) -> asyncio.Semaphore:
        if self._hashing is None:
            self._hashing = asyncio.Semaphore(self.max_hashing)
        return self._hashing

    def failed(self, address: str, email: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._records) > self.max_records:
                self._records = {k: r for k, r in self._records.items() if r.locked_until > now}
            for key, free in ((f"ip:{address}", self.free_failures_address), (f"email:{email}", self.free_failures)):
                r = self._records.setdefault(key, _Record())
                r.failures += 1
                if r.failures >= free:
                    r.locked_until = now + min(self.cap, self.base * 2 ** (r.failures - free))

    def succeeded(self, email: str) -> None:
        with self._lock:
            self._records.pop(f"email:{email}", None)


def _too_many(message: str, wait: float) -> APIError:
    return APIError(429, message, type_="rate_limit_error", code="too_many_sign_ins",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
