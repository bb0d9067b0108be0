"""Engine counters the server exposes (vLLM-style names are the server's business)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Histogram:
    """Sum, count and the most recent samples (seconds)."""

    total: float = 0.0
    count: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        self.recent.append(value)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
