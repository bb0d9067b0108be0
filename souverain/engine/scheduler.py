"""Continuous batching over the paged KV cache. Pure Python over integer lists: no torch.

Each step: running sequences first (a decode token each, or the next chunk of their prompt), in
priority order, under a per-step token budget; then waiting ones are admitted while the budget,
the sequence cap and the block pool allow: by priority, and within a priority round-robin between
tenants (the one with the fewest running sequences first), each tenant under its own cap. When blocks
run out, the lowest-priority running sequence not yet scheduled this step is preempted (the tenant
running the most first): its blocks are freed and it goes back to the waiting queue, to be recomputed
later (usually from the prefix cache).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from souverain.engine.blocks import BlockManager
from souverain.engine.request import EngineOverloaded, FinishReason, SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int
    sample: bool  # this chunk reaches the end of the sequence: sample its next token


@dataclass
class Batch:
    items: list[ScheduledSeq] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended before running (cancelled)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_waiting: int = 256
    max_model_len: int = 4096
    sliding_window: int | None = None


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig, eos_ids: Iterable[int] = ()) -> None:
        self.blocks = blocks
        self.config = config
        self.eos_ids = frozenset(eos_ids)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._by_request: dict[str, list[Sequence]] = {}

    # -- intake ---------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        """Queue one request's sequences; EngineOverloaded (nothing queued) past the bound."""
        if len(self.waiting) + len(seqs) > self.config.max_waiting:
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting already")
        request_id = seqs[0].request.request_id
        if request_id in self._by_request:
            raise ValueError(f"request id {request_id!r} is already running")
        self._by_request[request_id] = seqs
        self.waiting.extend(seqs)

    def cancel(self, request_id: str) -> None:
        """Mark a request's sequences; the next schedule() frees them."""
        for seq in self._by_request.get(request_id, ()):
            seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch(finished=self._reap_cancelled())
        budget = self.config.max_batched_tokens
        scheduled: set[int] = set()
        for seq in sorted(self.running, key=lambda s: s.sort_key):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n > 0 and self._make_room(seq, n, scheduled):
                batch.items.append(self._item(seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
        self.waiting.sort(key=lambda s: s.sort_key)
        running_of = Counter(s.request.tenant for s in self.running)
        candidates = list(self.waiting)
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            found = self._next_fair(candidates, running_of)
            if found is None:
                break
            seq = found
            self.blocks.admit(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if self.config.sliding_window:
                self.blocks.release_outside_window(seq, seq.num_computed, self.config.sliding_window)
            if not self.blocks.grow(seq, seq.num_computed + n):
                self.blocks.free(seq)
                break  # wait for running sequences to finish
            candidates.remove(seq)
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            running_of[seq.request.tenant] += 1
            batch.items.append(self._item(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        return batch

    @staticmethod
    def _next_fair(candidates: list[Sequence], running_of: Counter[str]) -> Sequence | None:
        """The waiting sequence to admit next: best priority first; within a priority, the tenant with the
        fewest running sequences (round-robin between tenants), then arrival. A tenant at its cap waits."""
        best: Sequence | None = None
        best_key: tuple[int, int, float, int] | None = None
        for seq in candidates:
            req = seq.request
            if req.tenant_max_running is not None and running_of[req.tenant] >= req.tenant_max_running:
                continue
            if seq.after is not None and seq.after.status is not SeqStatus.FINISHED and (
                    seq.after.num_computed < seq.after.prompt_len):
                continue  # its sibling is still computing the shared prompt
            key = (req.priority, running_of[req.tenant], req.arrival, seq.seq_id)
            if best_key is None or key < best_key:
                best, best_key = seq, key
        return best

    def _item(self, seq: Sequence, n: int) -> ScheduledSeq:
        return ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == len(seq.token_ids))

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        if self.config.sliding_window:
            self.blocks.release_outside_window(seq, seq.num_computed, self.config.sliding_window)
        while not self.blocks.grow(seq, seq.num_computed + n):
            candidates = [s for s in self.running if s.seq_id not in scheduled]
            # The lowest priority, then the tenant running the most, then the latest (seq is a candidate).
            running_of = Counter(s.request.tenant for s in self.running)
            victim = max(candidates, key=lambda s: (s.request.priority, running_of[s.request.tenant], s.request.arrival,
                                                    s.seq_id))
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.append(seq)

    def _reap_cancelled(self) -> list[Sequence]:
        gone = [s for s in self.running + self.waiting if s.cancelled]
        for seq in gone:
            self.finish(seq, FinishReason.CANCELLED)
        return gone

    # -- after the model ran ------------------------------------------------------------------------
    def update(self, batch: Batch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the scheduled sequences; append sampled tokens; return those that finished."""
        done = []
        for item in batch.items:
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed += item.num_tokens
            self.blocks.commit(seq)
            if item.sample and seq.seq_id in sampled:
                token = sampled[seq.seq_id]
                seq.token_ids.append(token)
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason)
                    done.append(seq)
        return done

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        out = len(seq.token_ids) - seq.prompt_len
        if out >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)):
            return FinishReason.STOP
        if out >= p.max_tokens:
            return FinishReason.LENGTH
        if len(seq.token_ids) >= self.config.max_model_len:
            return FinishReason.MODEL_LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now (also for stop strings and errors found by the engine)."""
        if seq.status is SeqStatus.FINISHED:
            return
        self.blocks.free(seq)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        siblings = self._by_request.get(seq.request.request_id, [])
        if all(s.status is SeqStatus.FINISHED for s in siblings):
            self._by_request.pop(seq.request.request_id, None)
