"""Batch invariance: a request's tokens do not depend on the traffic around it.

SmolLM2 (real weights) as `serve` runs it -- bf16, int4 weights, int8 output projection -- on the backend
this machine has and on each fallback it can run: 12 greedy prompts of 48 tokens alone, all at once, and
mixed into 20 other running streams and a long prompt prefilled in chunks; then again with their
prompts in the prefix cache; then preempted and recomputed in a small cache; and 4 seeded sampled prompts
alone and mixed. Every way, the same token ids.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from souverain import kernels, load_model, load_tokenizer
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.engine.request import Request, SamplingParams
from souverain.kernels.backend import available, choose
from souverain.model.quant import prepare, quantize

QUESTIONS = [
    "What is the capital of France?", "Name a colour.", "Write a haiku about the sea.", "2 + 2 =",
    "Who wrote Hamlet?", "Give me a word that rhymes with cat.", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "List three fruits.", "Why is the sky blue?",
    "What does a CPU do?", "Tell me a fun fact about octopuses.",
]
NEW = 48


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
    return tokens


@pytest.mark.parametrize("name", available(kernels.load()))
def test_same_tokens_alone_batched_mixed_and_cached(smollm2_path: Path, name: str) -> None:
    backend = choose(name=name)
    model = prepare(quantize(load_model(smollm2_path, dtype=torch.bfloat16), bits=4), backend)
    tok = load_tokenizer(smollm2_path)

    def engine(budget: int = 512) -> LLMEngine:
        return LLMEngine(model, tok, EngineConfig(kv_cache_memory=256 << 20, max_batched_tokens=budget),
                         backend=backend)

    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=NEW, ignore_eos=True)
              for i in range(4)]

    def ours(tag: str) -> list[Request]:
        return [Request(f"{tag}{i}", p, greedy) for i, p in enumerate(prompts)] + \
            [Request(f"{tag}s{i}", prompts[i], s) for i, s in enumerate(seeded)]

    # Alone: one request per fresh engine (nothing cached, nothing beside it).
    alone = {}
    for r in ours("a"):
        alone.update(run(engine(), [r]))
    alone = {k[1:]: v for k, v in alone.items()}
    assert all(len(t) == NEW for t in alone.values())

    # All at once.
    together = {k[1:]: v for k, v in run(engine(), ours("t")).items()}
    assert together == alone

    # Mixed: 20 other streams already decoding and a ~700-token prompt, with a small token budget so
    # prompts are prefilled in chunks beside decodes; then the same requests again in that engine,
    # their prompts now in the prefix cache.
    rng = random.Random(0)
    others = [Request(f"o{i}", [rng.randrange(200, 40000) for _ in range(rng.randrange(20, 120))],
                      SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)) for i in range(20)]
    long_prompt = Request("long", [rng.randrange(200, 40000) for _ in range(700)],
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    busy = engine(budget=96)
    for r in others:
        busy.add_request(r)
    for _ in range(6):  # the others are running when ours arrive
        busy.step()
    mixed = run(busy, [long_prompt, *ours("m")])
    assert {k[1:]: v for k, v in mixed.items() if k.startswith("m")} == alone
    hits = busy.stats.prefix_hits
    cached = {k[1:]: v for k, v in run(busy, ours("c")).items()}
    assert busy.stats.prefix_hits - hits > 16 * 16  # most of each prompt came from the cache
    assert cached == alone

    # Preempted: a cache of 40 blocks for 16 requests of ~6 blocks each, so sequences are evicted and
    # recomputed, their prompt and generated tokens in one chunk -- each token still computed its kind's way.
    args = model.args
    block = 2 * args.n_layers * 16 * args.n_kv_heads * args.hd * 2  # bytes: bf16 keys and values
    tight = LLMEngine(model, tok, EngineConfig(kv_cache_memory=40 * block, max_batched_tokens=256), backend=backend)
    preempted = {k[1:]: v for k, v in run(tight, ours("p")).items()}
    assert tight.stats.preemptions > 0
    assert preempted == alone


@pytest.mark.parametrize("name", available(kernels.load()))
def test_a_mixture_of_experts_is_invariant_too(name: str) -> None:
    """A small random Mixtral-shaped model (8 experts, top 2; int4 experts): a token's experts run on its
    row alone or among others' rows (each expert's rows in one product), the k outputs added in expert
    order -- greedy tokens alone equal batched and chunked."""
    from souverain.model import ModelArgs, MoeArgs, Transformer
    from tests.engine.toy import make_engine, run_all, tokens_of

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=258,
                                  max_seq_len=256, head_dim=32, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = quantize(model.to(torch.bfloat16).eval(), bits=4)
    backend = choose(name=name)
    prompts = [[(7 * i + 3 * j) % 250 for j in range(5 + 23 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def go(batch: list[int], budget: int = 512) -> dict[int, list[int]]:
        engine = make_engine(model, blocks=256, block_size=16, max_batched_tokens=budget, backend=backend)
        out = run_all(engine, {0: [Request(f"r{i}", prompts[i], params) for i in batch]})
        return {i: tokens_of(out[(f"r{i}", 0)]) for i in batch}

    together = go(list(range(6)))
    assert go(list(range(6)), budget=40) == together
    for i in range(6):
        assert go([i])[i] == together[i]
