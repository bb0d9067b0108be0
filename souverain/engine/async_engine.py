"""AsyncEngine: the model loop in its own thread; asyncio callers get an async stream per request."""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from souverain.engine.engine import LLMEngine
from souverain.engine.request import Delta, EngineOverloaded, Request

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException]
    open_samples: int  # samples the engine has not finished (counted on the loop as deltas arrive)
    done: asyncio.Event
    abandoned: bool = False  # the caller left early: deltas are counted, no longer queued


class AsyncEngine:
    """`generate(request)` yields Deltas as the engine thread produces them. Leaving the iterator
    early (the client went away) cancels the request; its blocks are freed at the next step, and
    `finished(request_id)` returns once the engine has ended all its samples (then `request.produced` is
    final: what a meter bills)."""

    def __init__(self, engine: LLMEngine, rebuild: Callable[[], LLMEngine] | None = None,
                 before_load: Callable[[AsyncEngine], None] | None = None) -> None:
        """`rebuild`: makes the engine again after `unload()` (the server's keep-alive and `souverain stop`);
        `before_load`: runs first (the server frees memory for it)."""
        self.engine = engine
        self.rebuild = rebuild
        self.before_load = before_load
        self.loaded = True
        self.last_used = time.monotonic()
        self._residency = threading.Lock()  # one load or unload at a time
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._pending_adds = 0  # sequences sent to the thread, not yet in its waiting queue
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="souverain-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def check_capacity(self, n: int = 1) -> None:
        """EngineOverloaded now if `n` more sequences would overflow the waiting queue."""
        waiting = len(self.engine.scheduler.waiting) + self._pending_adds
        if waiting + n > self.engine.scheduler.config.max_waiting:
            raise EngineOverloaded(f"{waiting} requests are waiting already")

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._streams) or self._pending_adds > 0

    def ensure_loaded(self) -> None:
        """Blocking (a worker thread, never the event loop): build the engine again if it was unloaded."""
        with self._residency:
            if self.loaded:
                return
            assert self.rebuild is not None
            if self.before_load is not None:
                self.before_load(self)
            stats = self.engine.stats
            self.engine = self.rebuild()
            self.engine.stats = stats  # counters carry on across reloads (Prometheus sees no reset)
            self.last_used = time.monotonic()
            self.loaded = True
            self.start()

    def unload(self) -> bool:
        """Free the weights and the KV cache of an idle engine (False, and nothing done, while it has work);
        the next request loads it again."""
        if self.rebuild is None:
            return False
        with self._residency:
            with self._lock:
                if not self.loaded or self._streams or self._pending_adds:
                    return not self.loaded
                self.loaded = False  # from here generate() waits for ensure_loaded(), which waits for us
            self.shutdown()
            self._stop = False
            if self.engine.has_unfinished():  # work no stream shows any more (a cancel in flight): keep it
                with self._lock:
                    self.loaded = True
                self.start()
                return False
            self.engine.release()
        gc.unfreeze()  # the server froze its heap after loading: let the collector see the old model's cycles
        gc.collect()
        gc.freeze()
        return True

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request.params.n, asyncio.Event())
        while True:
            if not self.loaded:
                await asyncio.to_thread(self.ensure_loaded)
            with self._lock:
                if not self.loaded:  # unloaded between the two: load again
                    continue
                self.last_used = time.monotonic()
                # Refused at once, here in the caller, rather than after the thread's current step.
                self.check_capacity(request.params.n)
                if request.request_id in self._streams:
                    raise ValueError(f"request id {request.request_id!r} is already in use")
                self._streams[request.request_id] = stream
                self._pending_adds += request.params.n
                break
        self.start()
        self._send("add", request)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if stream.done.is_set() and stream.queue.empty():  # the last items are queued before done is set
                    return
        finally:
            self.last_used = time.monotonic()
            if not stream.done.is_set():
                stream.abandoned = True
                self._send("cancel", request.request_id)

    async def finished(self, request_id: str, timeout: float = 10.0) -> bool:
        """Wait until the engine has ended every sample of `request_id` (a cancelled one within a step);
        False when that took longer than `timeout`."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return True
        try:
            await asyncio.wait_for(stream.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _send(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _deliver(self, request_id: str, item: Delta | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(self._arrive, request_id, stream, item)

    def _arrive(self, request_id: str, stream: _Stream, item: Delta | BaseException) -> None:
        """On the caller's loop: count finished samples, then queue the item unless the caller left."""
        if isinstance(item, BaseException) or item.finish_reason is not None:
            stream.open_samples = 0 if isinstance(item, BaseException) else stream.open_samples - 1
            if stream.open_samples <= 0:
                stream.done.set()
                with self._lock:
                    if self._streams.get(request_id) is stream:
                        del self._streams[request_id]
        if not stream.abandoned:
            stream.queue.put_nowait(item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(payload, Request)
                with self._lock:
                    self._pending_adds -= payload.params.n
                try:
                    self.engine.add_request(payload)
                except (ValueError, EngineOverloaded) as e:
                    self._deliver(payload.request_id, e)
                except Exception as e:
                    log.exception("could not add request %s", payload.request_id)
                    self._deliver(payload.request_id, RuntimeError(f"request could not start: {e}"))
            elif kind == "cancel":
                assert isinstance(payload, str)
                self.engine.cancel(payload)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:
                log.exception("engine step failed")
                self.error = e
                self._fail_all(e)
                continue
            for delta in deltas:
                self._deliver(delta.request_id, delta)

    def _fail_all(self, error: Exception) -> None:
        for delta in self.engine.abort_all(str(error) or type(error).__name__):
            self._deliver(delta.request_id, delta)
