"""LLMEngine.step() drives scheduler, runner and detokenisation; AsyncEngine streams it to asyncio."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np
import torch

from souverain.engine.adapters import AdapterCache
from souverain.engine.blocks import BlockManager
from souverain.engine.fused import build_decoder
from souverain.engine.grammar import MaskComputer
from souverain.engine.kv_cache import PagedKVCache
from souverain.engine.request import (
    Delta,
    FinishReason,
    Request,
    SeqStatus,
    Sequence,
    TokenLogprob,
)
from souverain.engine.runner import ModelRunner
from souverain.engine.scheduler import Batch, Scheduler, SchedulerConfig
from souverain.engine.stats import EngineStats
from souverain.engine.stops import StopMatcher
from souverain.kernels.backend import TORCH, Backend
from souverain.model.lora import LoraWeights
from souverain.model.quant import QuantLinear
from souverain.model.transformer import Transformer
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.incremental import IncrementalDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_memory: int = 1 << 30  # bytes for the KV block pool
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 1024  # per step: bounds how long a prompt chunk can stall decodes (vLLM-CPU: 2048)
    max_waiting: int = 256
    max_model_len: int | None = None  # default: the model's context, capped by the pool
    # Generated tokens read the values of a bf16 cache from an int8 copy beside them (kv_cache.py): half the bytes of
    # the read that bounds a many-stream decode step, for 1.25x the KV memory a token (vLLM's --kv-cache-dtype
    # is the nearest knob). None: where prompt tokens attend on the tiles' products (AMX, AVX-512 BF16), which read
    # the bf16 values (so a prompt's next token is computed as without the copy); True: wherever the C++ decode
    # kernel runs (every query of an AVX2 step reads the copy), else an error; False: never.
    int8_values: bool | None = None


@dataclass(eq=False)
class _SeqState:
    """Per-sequence detokenisation and sampling state (the scheduler's Sequence stays pure)."""

    decoder: IncrementalDecoder
    stops: StopMatcher
    generator: torch.Generator | None
    last_time: float = 0.0
    first_time: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_string_hit: bool = False
    matcher: Any = None  # llguidance.LLMatcher when the request carries a grammar
    grammar_error: str | None = None


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 adapters: AdapterCache | None = None, backend: Backend = TORCH) -> None:
        """`backend`: the kernels to run on (souverain.kernels.backend.choose()), for which the wiring code
        prepared the model (souverain.model.quant.prepare); the default runs PyTorch ops only."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.args = model.args  # kept by release(): what the server reads of an unloaded model
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.backend = backend
        args = model.args
        p = next(model.parameters())
        if backend.device != p.device.type:
            raise ValueError(f"backend {backend} runs on the {backend.device}, the model is on {p.device.type}")
        packed = {m.backend for m in model.modules() if isinstance(m, QuantLinear)} - {TORCH, backend}
        if packed:
            raise ValueError(f"the model's weights are packed for {', '.join(map(str, packed))}, not {backend}")
        fast = backend.ops
        # The C++ decode kernel reads keys stored transposed; the PyTorch path reads either layout.
        transposed = fast is not None and p.dtype in (torch.bfloat16, torch.float32) and fast.decode_supported(
            args.n_heads, args.n_kv_heads, args.hd, config.block_size)
        # Prompt tokens' queries attend on AMX tiles, or the same products on AVX-512 BF16 (bf16 models, keys
        # from position 0), generated tokens' through the vector kernel (kv_cache.py's TileSplit).
        isa = backend.prefill_isa
        tiles = isa if fast is not None and transposed and isa and p.dtype == torch.bfloat16 and \
            args.sliding_window is None and config.block_size % 16 == 0 and \
            fast.prefill_supported(args.n_heads, args.n_kv_heads, args.hd, isa) else 0
        if config.int8_values and not (transposed and p.dtype == torch.bfloat16):
            raise ValueError(f"int8 KV values need the C++ decode kernel and a bfloat16 model; backend {backend}, "
                             f"dtype {p.dtype} (leave int8_values unset, or False)")
        int8_values = config.int8_values if config.int8_values is not None else bool(tiles)
        num_blocks = PagedKVCache.blocks_for_memory(config.kv_cache_memory, args.n_layers, config.block_size,
                                                    args.n_kv_heads, args.hd, p.dtype, int8_values)
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} holds fewer than 2 blocks")
        capacity = num_blocks * config.block_size
        # A sequence alone must always fit, so preemption can always make progress.
        max_len = min(config.max_model_len or args.max_seq_len, args.max_seq_len)
        if config.max_model_len and config.max_model_len > args.max_seq_len:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of "
                             f"{args.max_seq_len} tokens")
        if config.max_model_len and args.sliding_window is None and config.max_model_len > capacity:
            raise ValueError(f"max_model_len {config.max_model_len} needs more KV cache than kv_cache_memory "
                             f"{config.kv_cache_memory} bytes holds ({capacity} tokens): raise kv_cache_memory")
        if args.sliding_window is None:
            max_len = min(max_len, capacity)
        elif args.sliding_window + 2 * config.block_size > capacity:
            raise ValueError("kv_cache_memory is too small for one sliding window")
        self.max_model_len = max_len
        self.cache = PagedKVCache(args.n_layers, num_blocks, config.block_size, args.n_kv_heads, args.hd,
                                  p.dtype, p.device, k_transposed=transposed, ops=fast if transposed else None,
                                  tiles=tiles, int8_values=int8_values)
        # Generated tokens' KV blocks serve later prompts only where prompt rows are computed as generated ones.
        split = bool(tiles) or any(isinstance(m, QuantLinear) and m.prompt_bf16 for m in model.modules())
        self.blocks = BlockManager(num_blocks, config.block_size, share_generated=not split)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_batched_tokens=config.max_batched_tokens,
            max_waiting=config.max_waiting, max_model_len=max_len, sliding_window=args.sliding_window,
        ), tokenizer.eos_ids)
        decoder = build_decoder(model, backend, config.block_size) if transposed else None
        self.runner = ModelRunner(model, self.cache, tokenizer.eos_ids, decoder)
        self.stats = EngineStats(kv_blocks_total=num_blocks)
        self._ids = count()
        self._state: dict[int, _SeqState] = {}
        self._unseeded = torch.Generator().manual_seed(0x5EED)
        self._masks: MaskComputer | None = None  # built on the first constrained step
        self._mask_thread: ThreadPoolExecutor | None = None

    # -- intake ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request (ValueError if it cannot run; EngineOverloaded if the queue is full)."""
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt holds token ids outside the vocabulary (size {vocab})")
        if len(request.prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in the model's "
                             f"context of {self.max_model_len}")
        if request.adapter is not None:
            if self.adapters is None:
                raise ValueError("this engine serves no adapters")
            self.adapters.get(request.adapter)  # loads it now: an unknown adapter fails this request only
            # Keys and values differ under an adapter: its prefix-cache blocks are its own.
            request = dataclasses.replace(request, cache_salt=f"{request.cache_salt}\x00lora:{request.adapter}")
        seqs: list[Sequence] = []
        for i in range(request.params.n):
            seq = Sequence(next(self._ids), request, i, list(request.prompt_ids), after=seqs[0] if seqs else None)
            seqs.append(seq)
        states = {seq.seq_id: self._new_state(seq) for seq in seqs}  # before queueing: nothing half-added
        self.scheduler.add(seqs)
        self._state.update(states)

    def _new_state(self, seq: Sequence) -> _SeqState:
        p = seq.params
        gen = None
        if p.seed is not None:
            # Any integer seed (OpenAI allows negative ones), folded into the generator's range.
            gen = torch.Generator().manual_seed((p.seed * 1_000_003 + seq.index) % (1 << 63))
        grammar = seq.request.grammar
        return _SeqState(IncrementalDecoder(self.tokenizer, prompt_ids=seq.token_ids), StopMatcher(p.stop),
                         gen, last_time=seq.request.arrival, matcher=grammar.matcher() if grammar else None)

    def _adapter(self, name: str) -> LoraWeights:
        assert self.adapters is not None
        return self.adapters.get(name)

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def release(self) -> None:
        """Drop the weights and the KV cache (keep-alive ran out, `souverain stop`): what is left answers for
        the model (args, context, stats) until AsyncEngine builds a fresh engine. Only an idle engine is
        released; it is never stepped again."""
        assert not self.has_unfinished(), "release() of an engine with work"
        self.model = self.runner = self.cache = None  # type: ignore[assignment]
        self.stats.kv_blocks_used = 0

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        batch = self.scheduler.schedule()
        deltas = [self._final(seq) for seq in batch.finished]
        if batch.items:
            deltas += self._run(batch)
        self._refresh_stats()
        return deltas

    def _run(self, batch: Batch) -> list[Delta]:
        sampling = [i for i in batch.items if i.sample]
        seqs = [i.seq for i in sampling]
        constrained = [(row, st.matcher) for row, s in enumerate(seqs)
                       if (st := self._state[s.seq_id]).matcher is not None]
        masks = self._start_masks([m for _, m in constrained])  # computed while the forward runs
        try:
            logits = self.runner.forward(batch.items, self._adapter)
        except Exception:
            log.exception("batched forward failed; retrying sequences one by one")
            if masks is not None:
                masks.result()
            return self._run_isolated(batch)
        mask = self._finish_masks(masks, [row for row, _ in constrained], seqs)
        # Greedy rows draw nothing: their generators stay where they are.
        sampled = self.runner.sample(logits, seqs, [self._uniform(s) if s.params.temperature else 0.0 for s in seqs],
                                     mask)
        for row, matcher in constrained:
            if not matcher.consume_token(sampled.tokens[row]):
                self._state[seqs[row].seq_id].grammar_error = matcher.get_error() or "grammar rejected the token"
        for item in batch.items:
            self.stats.prompt_tokens += max(0, min(item.start + item.num_tokens, item.seq.prompt_len) - item.start)
        tokens = {s.seq_id: t for s, t in zip(seqs, sampled.tokens, strict=True)}
        self.scheduler.update(batch, tokens)
        deltas = []
        for seq, token, lp in zip(seqs, sampled.tokens, sampled.logprobs, strict=True):
            try:
                delta = self._emit(seq, token, lp)
            except Exception as e:
                log.exception("request %s failed", seq.request.request_id)
                self.scheduler.finish(seq, FinishReason.ERROR)
                delta = self._final(seq, error=str(e) or type(e).__name__)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _start_masks(self, matchers: list[Any]) -> Future[np.ndarray] | None:
        if not matchers:
            return None
        if self._masks is None or self._mask_thread is None:
            self._masks = MaskComputer(self.model.args.vocab_size)
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="souverain-masks")
        return self._mask_thread.submit(self._masks.compute, matchers, self._masks.buffer(len(matchers)))

    def _finish_masks(self, masks: Future[np.ndarray] | None, rows: list[int], seqs: list[Sequence]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, allowed [C, V]) for the constrained rows. A row whose grammar allows nothing (its
        matcher failed) may only end: EOS is allowed there and the sequence ends with an error."""
        if masks is None or self._masks is None:
            return None
        allowed = self._masks.allowed(masks.result())
        dead = (~allowed.any(-1)).nonzero().flatten().tolist()
        for c in dead:
            state = self._state[seqs[rows[c]].seq_id]
            state.grammar_error = state.grammar_error or "constrained decoding reached a state with no allowed token"
            allowed[c, sorted(self.tokenizer.eos_ids)] = True
        return torch.tensor(rows, dtype=torch.long), allowed

    def _run_isolated(self, batch: Batch) -> list[Delta]:
        deltas: list[Delta] = []
        for item in batch.items:
            try:
                self.runner.forward([item], self._adapter)
            except Exception as e:
                log.exception("request %s failed", item.seq.request.request_id)
                self.scheduler.finish(item.seq, FinishReason.ERROR)
                deltas.append(self._final(item.seq, error=str(e) or type(e).__name__))
        # Nothing advanced: the healthy sequences run again next step (their KV writes repeat).
        return deltas

    def _uniform(self, seq: Sequence) -> float:
        gen = self._state[seq.seq_id].generator or self._unseeded
        return float(torch.rand((), generator=gen))

    def _emit(self, seq: Sequence, token: int, lp: tuple[float, list[tuple[int, float]]] | None) -> Delta | None:
        """Turn a sampled token into streamed text, honouring stop strings."""
        state = self._state[seq.seq_id]
        now = time.monotonic()
        if state.first_time is None:
            state.first_time = now
            self.stats.time_to_first_token.observe(now - seq.request.arrival)
        else:
            self.stats.inter_token_latency.observe(now - state.last_time)
        state.last_time = now
        self.stats.generation_tokens += 1
        seq.request.produced += 1
        if lp is not None:
            state.pending_logprobs.append(TokenLogprob(token, lp[0], tuple(lp[1])))
        if seq.status is SeqStatus.FINISHED:
            # EOS and stop_token_ids end the text without adding theirs.
            text = "" if seq.finish_reason is FinishReason.STOP else state.decoder.push(token)
            return self._final(seq, text=state.stops.feed(text)[0], token_ids=[token])
        if state.grammar_error is not None:
            self.scheduler.finish(seq, FinishReason.ERROR)
            return self._final(seq, token_ids=[token], error=state.grammar_error)
        out, hit = state.stops.feed(state.decoder.push(token))
        if hit:
            state.stop_string_hit = True
            self.scheduler.finish(seq, FinishReason.STOP)
            return self._final(seq, text=out, token_ids=[token])
        if state.matcher is not None and state.matcher.is_stopped():
            # The grammar is complete and allows nothing more: end now rather than spend a step on EOS.
            self.scheduler.finish(seq, FinishReason.STOP)
            return self._final(seq, text=out, token_ids=[token])
        return self._delta(seq, state, out, [token])

    def _delta(self, seq: Sequence, state: _SeqState | None, text: str, token_ids: list[int]) -> Delta:
        logprobs = None
        if state is not None and seq.params.logprobs is not None:
            logprobs, state.pending_logprobs = state.pending_logprobs, []
        return Delta(seq.request.request_id, seq.index, text, token_ids, logprobs)

    def _final(self, seq: Sequence, *, text: str = "", token_ids: list[int] | None = None,
               error: str | None = None) -> Delta:
        state = self._state.pop(seq.seq_id, None)
        if state is not None and not state.stop_string_hit:
            # Text held back (a partial character, a possible stop string) is output after all.
            text += state.stops.feed(state.decoder.flush())[0] + state.stops.flush()
        delta = self._delta(seq, state, text, token_ids or [])
        delta.finish_reason = seq.finish_reason
        delta.error = error
        delta.prompt_tokens = seq.prompt_len
        delta.completion_tokens = len(seq.output_ids)
        self.stats.requests_finished += 1
        return delta

    def abort_all(self, error: str) -> list[Delta]:
        """End every unfinished sequence with an error (the engine itself failed)."""
        deltas = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, FinishReason.ERROR)
            deltas.append(self._final(seq, error=error))
        self._refresh_stats()
        return deltas

    def _refresh_stats(self) -> None:
        s = self.stats
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.blocks.num_used
        s.prefix_queries = self.blocks.stats.queries
        s.prefix_hits = self.blocks.stats.hits
        s.preemptions = self.scheduler.preemptions
