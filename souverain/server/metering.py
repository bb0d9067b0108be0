"""Metering that cannot lose tokens: a usage row opened at admission and kept up to date by one writer thread.

Each generating request has a Meter. The Ledger's writer thread commits, in one transaction per round, every
meter whose engine count (`Request.produced`) moved: the row's completion tokens and the organisation's
month. Streams are write-ahead: a chunk is sent only once a commit covers its tokens (rounds are grouped, at
least `spacing` apart), so what a client received is billed even if the server is SIGKILLed the next instant.
Requests that stream nothing are written at least every `heartbeat` seconds. Whatever ends a request (finish,
disconnect, cancel, error) closes its meter with the engine's final count; rows left `running` by a dead
server are marked `interrupted` by the next server (their tokens were billed as they were written).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from souverain.db import usage
from souverain.db.database import Database
from souverain.server.errors import APIError

log = logging.getLogger(__name__)

TOUCH_EVERY = 20.0  # seconds: open rows are touched at least this often, so they never look stale
COMMIT_TIMEOUT = 30.0  # seconds a stream waits for its tokens' commit before it ends with a 503
NEVER_BEGUN_AFTER = 30.0  # seconds after which a meter whose response never began is closed as cancelled
IDLE_EXIT = 30.0  # seconds without an open meter after which the writer thread ends (the next one restarts it)


@dataclass(eq=False)
class Meter:
    """One request's usage. `produced()` is the engine's count of generated tokens (all samples)."""

    ledger: Ledger | None  # None: not written (operator keys, a server without a database)
    identity: usage.Usage  # request id, model, endpoint, prompt tokens, organisation, workspace, key, user
    produced: Callable[[], int]
    on_close: Callable[[int], None] = lambda tokens: None  # refunds and releases, with the final count
    started: float = field(default_factory=time.monotonic)
    delivered: int = 0  # completion tokens handed to the client so far
    status: str = "stop"
    closed: bool = False
    begun: bool = False  # its response started consuming the engine (a stream the server never began is swept)
    # Written by the ledger's thread only:
    row_id: int | None = None
    committed: int = -1  # completion tokens in the database; -1 before the row exists
    final: str | None = None  # the status to write; set once, by close()
    touched: float = 0.0
    waiters: list[tuple[int | None, asyncio.Future[None], asyncio.AbstractEventLoop]] = field(default_factory=list)

    def add(self, token_ids: int, finish_reason: str | None = None) -> None:
        """Tokens about to be sent to the client; a sample's finish reason becomes the request's status."""
        self.delivered += token_ids
        if finish_reason is not None:
            self.status = finish_reason

    async def covered(self) -> None:
        """Wait until everything delivered so far is committed (write-ahead for streams)."""
        if self.ledger is not None:
            await self.ledger.wait(self, self.delivered)

    async def close(self, status: str | None = None) -> None:
        """Write the final count and status (once); returns when it is committed."""
        if self.closed:
            return
        self.closed = True
        final = status or self.status
        self.on_close(self.produced())
        if self.ledger is not None:
            await asyncio.shield(self.ledger.finish(self, final))


@dataclass
class Ledger:
    db: Database
    now: Callable[[], datetime]
    spacing: float = 0.05  # seconds between two commits while streams wait on them (at most 20 commits/s)
    heartbeat: float = 1.0  # seconds between commits of progress nobody waits on
    stale_after: float = 60.0  # seconds: a running row not touched for this long belongs to a dead server
    _open: dict[int, Meter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _stop: bool = False

    def open(self, meter: Meter) -> None:
        with self._lock:
            self._open[id(meter)] = meter
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="souverain-ledger", daemon=True)
                self._thread.start()

    async def wait(self, meter: Meter, tokens: int | None) -> None:
        """Until a commit covers `tokens` completion tokens of `meter` (None: its final row)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if tokens is not None and meter.committed >= tokens:
                return
            if tokens is None and id(meter) not in self._open:
                return
            meter.waiters.append((tokens, fut, loop))
        self._wake.set()
        try:
            await asyncio.wait_for(fut, COMMIT_TIMEOUT)
        except TimeoutError:
            # Fail closed: nothing is served that could not be billed.
            raise APIError(503, "usage could not be recorded (the database does not answer); retry later",
                           type_="server_error", code="metering_unavailable") from None

    async def finish(self, meter: Meter, status: str) -> None:
        with self._lock:
            meter.final = status
        await self.wait(meter, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def settle_stale(self) -> int:
        """Mark rows left running by a dead server `interrupted`; their written tokens stay billed."""
        try:
            with self.db.session() as s:
                return usage.settle_stale(s, before=self.now() - timedelta(seconds=self.stale_after))
        except Exception:
            log.exception("could not settle usage rows of earlier servers")
            return 0

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        last_settle = idle_since = time.monotonic()
        while True:
            self._wake.wait(self.heartbeat)
            self._wake.clear()
            try:
                self._flush()
            except Exception:
                log.exception("usage flush failed; retrying")
                time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                if self._open:
                    idle_since = now
                elif self._stop or now - idle_since > IDLE_EXIT:  # nothing to write: the thread ends
                    self._thread = None
                    return
            if now - last_settle > self.stale_after:
                self.settle_stale()
                last_settle = now
            time.sleep(self.spacing)

    def _flush(self) -> None:
        mono = time.monotonic()
        with self._lock:
            # A streamed response whose client left before the server began it never runs its generator, so
            # nothing would close its meter (nor give back its reservation): swept here.
            never = [m for m in self._open.values() if not m.begun and not m.closed
                     and mono - m.started > NEVER_BEGUN_AFTER]
            for m in never:
                m.closed, m.final = True, "cancelled"
        for m in never:
            m.on_close(m.produced())
        with self._lock:
            work = []
            for m in self._open.values():
                produced = m.produced()
                if (m.row_id is None or produced != m.committed or m.final is not None
                        or mono - m.touched > TOUCH_EVERY):
                    work.append((m, produced, m.final))
        if not work:
            return
        with self.db.session() as s:
            ids = usage.write_batch(s, rows=[
                usage.Progress(m.identity, m.row_id, produced, max(m.committed, 0), final or "running",
                               int((mono - m.started) * 1000)) for m, produced, final in work], at=self.now())
        written = [(m, produced, final, row_id) for (m, produced, final), row_id in zip(work, ids, strict=True)]
        with self._lock:
            for m, produced, final, row_id in written:
                m.row_id, m.committed, m.touched = row_id, produced, mono
                keep = []
                for tokens, fut, loop in m.waiters:
                    if final is not None or (tokens is not None and produced >= tokens):
                        loop.call_soon_threadsafe(_resolve, fut)
                    else:
                        keep.append((tokens, fut, loop))
                m.waiters = keep
                if final is not None:
                    self._open.pop(id(m), None)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
