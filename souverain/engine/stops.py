"""Stop strings cut exactly: text is held back while it could still be the start of a stop."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (what may be emitted now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        safe = max(0, len(buf) - self.hold)
        self.pending = buf[safe:]
        return buf[:safe], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
