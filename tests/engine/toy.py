"""A byte-level tokenizer and tiny random models for engine tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.kernels.backend import Backend, choose
from souverain.model import ModelArgs, MoeArgs, Transformer
from souverain.model.quant import prepare

BOS, EOS = 256, 257


class ByteTokenizer:
    """UTF-8 bytes as tokens: multi-byte characters span tokens, as in byte-level BPE."""

    vocab_size = 258
    bos_id = BOS
    eos_ids = frozenset([EOS])

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return ([BOS] if add_special else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id >= 256

    def apply_chat_template(self, messages, *, add_generation_prompt=True, tools=None) -> list[int]:
        raise NotImplementedError

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b"\xff<s>", b"\xff</s>"]


BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=258, max_seq_len=512)
MODELS = {
    "dense": ModelArgs(**BASE),
    "sliding_window": ModelArgs(**BASE, sliding_window=12),
    "moe": ModelArgs(**BASE, moe=MoeArgs(num_experts=4, num_experts_per_tok=2)),
}


def tiny_model(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(MODELS[name])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def make_engine(model: Transformer, *, blocks: int = 256, block_size: int = 4, adapters: object = None,
                backend: Backend | None = None, **kw: object) -> LLMEngine:
    """An engine on `backend` (default: what SOUVERAIN_KERNELS asks for, else the fastest this machine
    runs), the model prepared for it."""
    args = model.args
    backend = backend or choose(next(model.parameters()).device)
    per_block = 2 * args.n_layers * block_size * args.n_kv_heads * args.hd * 4
    return LLMEngine(prepare(model, backend), ByteTokenizer(),
                     EngineConfig(kv_cache_memory=blocks * per_block, block_size=block_size, **kw),  # type: ignore[arg-type]
                     adapters=adapters, backend=backend)  # type: ignore[arg-type]


def run_all(engine: LLMEngine, joins: dict[int, list] | None = None, max_steps: int = 10_000):
    """Step until done; `joins` adds requests at given step numbers. Returns deltas per (id, index)."""
    joins = dict(joins or {})
    out: dict[tuple[str, int], list] = {}
    step = 0
    while engine.has_unfinished() or joins:
        for request in joins.pop(step, []):
            engine.add_request(request)
        for d in engine.step():
            out.setdefault((d.request_id, d.index), []).append(d)
        step += 1
        assert step < max_steps, "engine did not finish"
    return out


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas) -> str:
    return "".join(d.text for d in deltas)
