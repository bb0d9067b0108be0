"""Requests, sampling parameters and what the engine streams back. Pure Python."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the grammar module needs torch and llguidance; requests and the scheduler do not
    from souverain.engine.grammar import Grammar


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    MODEL_LENGTH = "model_length"
    CANCELLED = "cancelled"
    ERROR = "error"


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should answer 429/503 and retry later."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls (vLLM/OpenAI semantics). Invalid values raise ValueError
    naming the field."""

    max_tokens: int = 256
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None = none; k = the chosen token's and the top-k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's semantics

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must lie in [0, max_tokens]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must lie in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must lie in (0, 1]"),
            ("top_k", self.top_k >= 0 or self.top_k == -1, "must be 0 or -1 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must lie in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must lie in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must lie in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must lie in (0, 10]"),
            ("n", 1 <= self.n <= 128, "must lie in [1, 128]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must lie in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
             "must be at most 16 non-empty strings"),
            ("logit_bias", len(self.logit_bias) <= 300 and all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             "must map at most 300 token ids to biases in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first
    # Prefix-cache isolation: only requests with the same salt share cached blocks.
    cache_salt: str = ""
    adapter: str | None = None  # a LoRA adapter's name; None = the base model
    grammar: Grammar | None = None  # constrained decoding: every sample's output follows this grammar
    arrival: float = field(default_factory=time.monotonic)
    # Fair sharing: requests of one tenant (an organisation) are admitted round-robin with other tenants of
    # the same priority, and at most `tenant_max_running` of its sequences run at once (None: no cap).
    tenant: str = ""
    tenant_max_running: int | None = None
    # Tokens generated so far over all samples, written by the engine thread only: what a meter bills,
    # whatever ends the request.
    produced: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt must hold at least one token")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


@dataclass
class Delta:
    """One streamed piece of one sample (`index` among the request's n)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample being generated: the scheduler's unit. Holds its tokens (prompt, then output),
    how many of them have KV in the cache, and the blocks that hold it."""

    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)  # -1: released (left the sliding window)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    preemptions: int = 0
    # A sibling whose prompt must be computed first, so that this one shares its blocks.
    after: Sequence | None = None

    def __post_init__(self) -> None:
        self.prompt_len = len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (self.request.priority, self.request.arrival, self.seq_id)
