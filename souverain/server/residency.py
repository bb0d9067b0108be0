"""Which models are in memory: keep-alive (an idle model is unloaded after it), an LRU cap on how many stay
loaded, and room made before a load when the machine's memory is short. A request to an unloaded model loads it
again (AsyncEngine.ensure_loaded); `souverain stop` unloads one now."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from souverain.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weights_size(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Slot:
    id: str
    engine: AsyncEngine
    size: int  # bytes it takes loaded: its weights' files and its KV cache


@dataclass
class Residency:
    keep_alive: float | None = None  # seconds an idle model stays loaded; None: for ever
    max_loaded: int | None = None  # most models loaded at once; None: no cap
    slots: dict[str, Slot] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, model_id: str, engine: AsyncEngine, size: int) -> None:
        engine.before_load = self.make_room
        self.slots[model_id] = Slot(model_id, engine, size)

    def slot_of(self, engine: AsyncEngine) -> Slot | None:
        return next((s for s in self.slots.values() if s.engine is engine), None)

    def until(self, engine: AsyncEngine) -> float | None:
        """When an idle loaded model will be unloaded (epoch seconds); None: never (or not loaded)."""
        if self.keep_alive is None or not engine.loaded:
            return None
        if engine.busy:
            return time.time() + self.keep_alive
        return time.time() + max(0.0, self.keep_alive - (time.monotonic() - engine.last_used))

    def make_room(self, loading: AsyncEngine) -> None:
        """Before `loading` loads: unload the least recently used idle models while more than `max_loaded` would
        be in memory, or while the machine lacks the memory the new one takes."""
        slot = self.slot_of(loading)
        need = slot.size if slot else 0
        for other in sorted((s for s in self.slots.values() if s.engine is not loading and s.engine.loaded),
                            key=lambda s: s.engine.last_used):
            loaded = sum(1 for s in self.slots.values() if s.engine.loaded)
            available = memory_available()
            over_count = self.max_loaded is not None and loaded + 1 > self.max_loaded
            short = available is not None and available < need
            if not (over_count or short):
                break
            if other.engine.unload():
                log.warning("unloaded %s to make room for %s (%s)", other.id, slot.id if slot else "a model",
                            "--max-loaded-models" if over_count else "memory is short")

    def trim(self) -> list[str]:
        """At start, every served model was loaded once (so a broken one fails the start): keep the first
        `max_loaded` in memory, unload the rest until their first request."""
        if self.max_loaded is None:
            return []
        extra = [s for s in self.slots.values() if s.engine.loaded][self.max_loaded:]
        return [s.id for s in extra if s.engine.unload()]

    def reap(self) -> list[str]:
        """Unload every idle model whose keep-alive ran out; returns their ids."""
        if self.keep_alive is None:
            return []
        done = []
        for slot in self.slots.values():
            engine = slot.engine
            idle = engine.loaded and not engine.busy and time.monotonic() - engine.last_used > self.keep_alive
            if idle and engine.unload():
                log.warning("unloaded %s: idle for more than the keep-alive of %gs", slot.id, self.keep_alive)
                done.append(slot.id)
        return done

    def start(self) -> None:
        if self.keep_alive is None or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(min(1.0, max(0.05, self.keep_alive or 1.0) / 4)):
                try:
                    self.reap()
                except Exception:  # never let the reaper die: a model would stay loaded for ever
                    log.exception("keep-alive check failed")

        self._thread = threading.Thread(target=loop, name="souverain-keep-alive", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def parse_duration(value: str) -> float | None:
    """Keep-alive as Ollama writes it: `5m`, `1h`, `30s`, `300` (seconds); `-1`/`forever` never unloads."""
    value = value.strip().lower()
    if value in ("-1", "forever", "inf", "never"):
        return None
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            number = value[: -len(unit)]
            break
    else:
        unit, number = "s", value
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{value!r} is not a duration: write 300, 30s, 5m, 1h, or -1 for ever") from None
    if seconds < 0:
        raise ValueError(f"{value!r}: a keep-alive is -1 (for ever) or not negative")
    return seconds
