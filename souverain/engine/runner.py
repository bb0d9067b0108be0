"""Batch -> tensors -> model -> sampled tokens. One forward per step for every scheduled sequence."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from souverain.engine.kv_cache import AttentionGroup, PagedKVCache, PagedStep, TileSplit, build_group, row_keys
from souverain.engine.request import Sequence
from souverain.engine.sampling import SamplingTensors, apply_mask, apply_penalties, ban, logprobs_of, sample
from souverain.engine.scheduler import ScheduledSeq
from souverain.model.layers import PromptRows
from souverain.model.lora import LoraBatch, LoraWeights
from souverain.model.transformer import Transformer


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, eos_ids: Iterable[int] = (),
                 decoder: Any | None = None) -> None:
        self.model = model
        self.cache = cache
        self.decoder = decoder  # the C++ decoder (souverain/engine/fused.py) for steps of decodes only
        self.device = next(model.parameters()).device
        self.vocab = model.args.vocab_size
        self.eos_ids = sorted(set(eos_ids))
        self.window = model.args.sliding_window
        self.ops = cache.ops  # the backend's C++ kernels, or None

    @torch.inference_mode()
    def forward(self, items: list[ScheduledSeq], adapter: Callable[[str], LoraWeights] | None = None
                ) -> torch.Tensor:
        """Logits [R, V] for the items that sample, in their order, in the model's dtype (`sample` converts
        them as it needs). Items whose request names an adapter get its LoRA update, in the same forward
        as the others (`adapter` looks them up)."""
        # Rows of prompt tokens first, then any item holding both kinds (a recompute after preemption),
        # then generated tokens: each kind one run of rows for the projections that compute them apart.
        def kind(item: ScheduledSeq) -> int:
            end, prompt_len = item.start + item.num_tokens, item.seq.prompt_len
            return 0 if end <= prompt_len else 1 if item.start < prompt_len else 2

        order = sorted(range(len(items)), key=lambda i: kind(items[i]))
        last_row = [0] * len(items)
        sampled = [i for i in range(len(items)) if items[i].sample]
        items = [items[i] for i in order]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        kinds: list[bool] = []  # per row: a prompt token (else a generated one)
        bs = self.cache.block_size
        for item in items:
            seq, a, n = item.seq, item.start, item.num_tokens
            offsets.append(len(tokens))
            tokens += seq.token_ids[a : a + n]
            positions += range(a, a + n)
            kinds += [p < seq.prompt_len for p in range(a, a + n)]
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(a, a + n)]
            last_row[order[len(offsets) - 1]] = len(tokens) - 1
        out_rows = [last_row[i] for i in sampled]  # the logits in the callers' order
        dev = self.device
        lora = self._lora(items, adapter)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        tables = [i.seq.block_table for i in items]
        counts = [i.num_tokens for i in items]
        # The C++ kernels attend every query the same way: the block table and key range of each row.
        rows = None if self.cache.ops is None else row_keys([i.start for i in items], counts, tables, self.window, dev)
        if rows is not None and self.cache.tiles:
            rows.split = TileSplit.of(rows, kinds)
        prompt = PromptRows.of(kinds, dev)
        decodes = len(tokens) == len(out_rows) == len(items) and prompt is None
        if self.decoder is not None and rows is not None and lora is None and decodes:
            # One generated token per sequence, each sampled: the layers in one C++ call.
            h = self.model.tok_embeddings(torch.tensor(tokens, device=dev))
            cos, sin = self.model.rope_tables(torch.tensor(positions, device=dev), h.dtype)
            h = self.decoder.forward(h, cos, sin, self.cache.k, self.cache.v, slot_t, rows.tables, rows.lo, rows.hi,
                                     self.cache.block_size, self.cache.v8, self.cache.v_scale)
            return self.model.head(h, self.ops)
        step = PagedStep(self.cache, slot_t, [] if rows is not None else self._groups(items, offsets), rows)
        logits = self.model(torch.tensor([tokens], device=dev), torch.tensor([positions], device=dev), step,
                            output_rows=torch.tensor(out_rows, dtype=torch.long, device=dev), lora=lora, ops=self.ops,
                            prompt=prompt)
        return logits

    def _lora(self, items: list[ScheduledSeq], adapter: Callable[[str], LoraWeights] | None) -> LoraBatch | None:
        names = [i.seq.request.adapter for i in items]
        if adapter is None or not any(names):
            return None
        order = sorted({n for n in names if n})
        weights = [adapter(n) for n in order]
        slots: list[int] = []
        for item, name in zip(items, names, strict=True):
            slots += [order.index(name) if name else -1] * item.num_tokens
        return LoraBatch.from_slots(weights, slots, self.device)

    def _groups(self, items: list[ScheduledSeq], offsets: list[int]) -> list[AttentionGroup]:
        # Decodes (one query each) and prefill chunks are padded separately: mixing them would pad
        # every decode to the longest chunk. Chunks that start a sequence (nothing cached before them)
        # attend among their own tokens only: plain causal attention, no keys read back from the cache.
        def kind(item: ScheduledSeq) -> str:
            if item.num_tokens == 1:
                return "decode"
            fresh = item.start == 0 and (self.window is None or item.num_tokens <= self.window)
            return "fresh" if fresh else "chunk"

        groups = []
        for want in ("decode", "fresh", "chunk"):
            chosen = [(i, off) for i, off in zip(items, offsets, strict=True) if kind(i) == want]
            if chosen:
                groups.append(build_group([i.start for i, _ in chosen], [i.num_tokens for i, _ in chosen],
                                          [off for _, off in chosen], [i.seq.block_table for i, _ in chosen],
                                          self.cache.block_size, self.window, self.device, local=want == "fresh"))
        return groups

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], uniforms: list[float],
               mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> Sampled:
        """Sample one token per row of `logits` for `seqs` (same order). `mask` = (rows, allowed [C, V]):
        those rows may only take allowed tokens (constrained decoding)."""
        tensors = self._sampling_tensors(seqs, uniforms)
        if mask is not None and tensors.banned is not None:
            # min_tokens never overrules a grammar that allows nothing but the end (the banned stop ids).
            rows, allowed = mask
            rest = allowed.clone()
            rest[:, tensors.banned[1]] = False
            keep = ~torch.isin(tensors.banned[0], rows[~rest.any(-1)])
            tensors.banned = (tensors.banned[0][keep], tensors.banned[1][keep]) if bool(keep.any()) else None
        want = [s.params.logprobs for s in seqs]
        greedy_only = all(s.params.temperature == 0 for s in seqs) and tensors.presence is None and \
            tensors.repetition is None and tensors.bias is None
        if not greedy_only or any(w is not None for w in want):
            logits = logits.float()  # penalties, probabilities and log-probabilities in fp32
        raw = logits
        logits = apply_penalties(logits, tensors)
        if mask is not None or tensors.banned is not None:
            # In place (fresh [R, V] tensors cost page faults each step: ~3 ms at 32 x 49k here) unless the raw
            # logits are still needed (log-probabilities) and not copied yet.
            if logits is raw and any(w is not None for w in want):
                logits = logits.clone()
            if mask is not None:
                logits = apply_mask(logits, *mask)
            if tensors.banned is not None:
                logits = ban(logits, tensors.banned)
        tokens = sample(logits, tensors, self.ops)
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(seqs)
        if any(w is not None for w in want):
            k = max(w or 0 for w in want)
            chosen, top_v, top_i = logprobs_of(raw, tokens, k)
            chosen_l, top_vl, top_il = chosen.tolist(), top_v.tolist(), top_i.tolist()
            for r, w in enumerate(want):
                if w is not None:
                    logprobs[r] = (chosen_l[r], list(zip(top_il[r][:w], top_vl[r][:w], strict=True)))
        return Sampled(tokens.tolist(), logprobs)

    def _sampling_tensors(self, seqs: list[Sequence], uniforms: list[float]) -> SamplingTensors:
        dev = self.device
        ps = [s.params for s in seqs]
        t = SamplingTensors(
            temperature=torch.tensor([p.temperature for p in ps], device=dev),
            top_k=torch.tensor([min(p.top_k, self.vocab) if p.top_k > 0 else 0 for p in ps], device=dev),
            top_p=torch.tensor([p.top_p for p in ps], device=dev),
            min_p=torch.tensor([p.min_p for p in ps], device=dev),
            uniform=torch.tensor(uniforms, device=dev),
        )
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            t.presence = torch.tensor([p.presence_penalty for p in ps], device=dev)
            t.frequency = torch.tensor([p.frequency_penalty for p in ps], device=dev)
            t.output_counts = self._counts([s.output_ids for s in seqs])
        if any(p.repetition_penalty != 1.0 for p in ps):
            t.repetition = torch.tensor([p.repetition_penalty for p in ps], device=dev)
            t.seen = self._counts([s.token_ids for s in seqs]) > 0
        if any(p.logit_bias for p in ps):
            t.bias = torch.zeros(len(seqs), self.vocab, device=dev)
            for r, p in enumerate(ps):
                for token, bias in p.logit_bias:
                    if token < self.vocab:
                        t.bias[r, token] += bias
        short = [r for r, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens]
        pairs = [(r, i) for r in short for i in sorted({*self.eos_ids, *seqs[r].params.stop_token_ids})
                 if 0 <= i < self.vocab]
        if pairs:
            t.banned = (torch.tensor([r for r, _ in pairs], dtype=torch.long, device=dev),
                        torch.tensor([i for _, i in pairs], dtype=torch.long, device=dev))
        return t

    def _counts(self, histories: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(h) for h in histories))
        ids = torch.tensor([h + [0] * (width - len(h)) for h in histories], device=self.device)
        present = torch.tensor([[1.0] * len(h) + [0.0] * (width - len(h)) for h in histories], device=self.device)
        return torch.zeros(len(histories), self.vocab, device=self.device).scatter_add_(1, ids, present)
