"""Batched, paged, preempted, prefix-cached generation equals each request run alone."""

from __future__ import annotations

import random

import pytest

from souverain.engine.request import EngineOverloaded, FinishReason, Request, SamplingParams
from souverain.engine.simple import generate_tokens
from tests.engine.toy import EOS, MODELS, make_engine, run_all, text_of, tiny_model, tokens_of


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Mixed lengths; several longer than the sliding window (12) and than a block (4).
    return [[rng.randrange(256) for _ in range(rng.choice([1, 3, 7, 13, 29, 41]))] for _ in range(n)]


def alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    return list(generate_tokens(model, prompt, max_tokens=max_tokens, stop_ids=[EOS]))


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_equals_alone_with_joins(name: str) -> None:
    model = tiny_model(name)
    engine = make_engine(model, max_batched_tokens=32)
    ps = prompts(8)
    # Requests join at different steps (and leave when done): continuous batching.
    joins: dict[int, list[Request]] = {}
    for i, (step, p) in enumerate(zip([0, 0, 1, 3, 3, 6, 9, 15], ps, strict=True)):
        joins.setdefault(step, []).append(Request(f"r{i}", p, GREEDY))
    out = run_all(engine, joins)
    for i, p in enumerate(ps):
        assert tokens_of(out[(f"r{i}", 0)]) == alone(model, p, 12), i
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("name", list(MODELS))
def test_preemption_keeps_answers_right(name: str) -> None:
    model = tiny_model(name)
    # 14 blocks of 4 tokens for 6 sequences of up to ~53 tokens: preemption is unavoidable.
    engine = make_engine(model, blocks=14, max_batched_tokens=16)
    ps = prompts(6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(ps)]})
    assert engine.stats.preemptions > 0
    for i, p in enumerate(ps):
        assert tokens_of(out[(f"r{i}", 0)]) == alone(model, p, 12), i
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_hits_are_counted_and_exact() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    system = [random.Random(2).randrange(256) for _ in range(40)]
    first = [*system, 1, 2, 3]
    second = [*system, 4, 5, 6, 7]
    run_all(engine, {0: [Request("a", first, GREEDY)]})
    hits_before = engine.stats.prefix_hits
    out = run_all(engine, {0: [Request("b", second, GREEDY)]})
    assert engine.stats.prefix_hits - hits_before == 40  # ten full blocks of the shared prompt
    assert tokens_of(out[("b", 0)]) == alone(model, second, 12)
    # Another organisation (salt) shares nothing.
    before = engine.stats.prefix_hits
    run_all(engine, {0: [Request("c", second, GREEDY, cache_salt="org-2")]})
    assert engine.stats.prefix_hits == before


def test_stop_strings_cut_exactly_across_tokens() -> None:
    model = tiny_model("dense")
    prompt = [72, 105, 32]
    full = bytes(t for t in alone(model, prompt, 30) if t < 256).decode("utf-8", errors="replace")
    stop = full[5:8]  # three bytes: spans three tokens
    assert len(stop.encode()) >= 2
    engine = make_engine(model)
    out = run_all(engine, {0: [Request("s", prompt, SamplingParams(temperature=0, max_tokens=30, stop=(stop,)))]})
    deltas = out[("s", 0)]
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert all(stop not in d.text for d in deltas)


def test_seed_reproduces_whatever_the_batch() -> None:
    model = tiny_model("dense")
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=16, seed=42)
    solo = run_all(make_engine(model), {0: [Request("x", [1, 2, 3], params)]})
    crowd = [Request(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=20)) for i, p in enumerate(prompts(5))]
    mixed = run_all(make_engine(model), {0: crowd[:3], 2: [Request("x", [1, 2, 3], params)], 4: crowd[3:]})
    assert tokens_of(solo[("x", 0)]) == tokens_of(mixed[("x", 0)])


def test_n_samples_share_prompt_blocks() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    prompt = list(range(40))  # ten full blocks
    params = SamplingParams(temperature=1.0, max_tokens=6, n=4, seed=7)
    engine.add_request(Request("n", prompt, params))
    peak = 0
    out: dict = {}
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.index, []).append(d)
        peak = max(peak, engine.blocks.num_used)
    assert sorted(out) == [0, 1, 2, 3]
    # Unshared, 4 samples would hold 4 x 10 prompt blocks at once.
    assert peak < 4 * 10
    assert engine.stats.prefix_hits >= 3 * 36
    assert len({tuple(tokens_of(v)) for v in out.values()}) > 1  # different samples


def test_cancellation_returns_the_pool() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    for i, p in enumerate(prompts(4)):
        engine.add_request(Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)))
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_used > 0
    for i in range(4):
        engine.cancel(f"r{i}")
    finals = engine.step()
    assert {d.finish_reason for d in finals} == {FinishReason.CANCELLED}
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()


def test_queue_bound_overloads() -> None:
    engine = make_engine(tiny_model("dense"), max_waiting=3)
    for i in range(3):
        engine.add_request(Request(f"r{i}", [1, 2], GREEDY))
    with pytest.raises(EngineOverloaded):
        engine.add_request(Request("r3", [1, 2], GREEDY))
    assert len(engine.scheduler.waiting) == 3


def test_failing_request_leaves_others_running() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    good = prompts(3)
    for i, p in enumerate(good):
        engine.add_request(Request(f"ok{i}", p, GREEDY))
    engine.add_request(Request("bad", [1, 2, 3], GREEDY))
    # Corrupt the bad request after validation: a token the embedding cannot look up.
    bad = next(s for s in engine.scheduler.waiting if s.request.request_id == "bad")
    bad.token_ids[1] = 10_000
    out = run_all(engine)
    assert out[("bad", 0)][-1].finish_reason is FinishReason.ERROR
    for i, p in enumerate(good):
        assert tokens_of(out[(f"ok{i}", 0)]) == alone(model, p, 12)


def test_min_tokens_and_max_tokens() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    params = SamplingParams(temperature=0, max_tokens=5, min_tokens=5)
    out = run_all(engine, {0: [Request("m", [1, 2, 3], params)]})
    assert len(tokens_of(out[("m", 0)])) == 5
    assert out[("m", 0)][-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert EOS not in tokens_of(out[("m", 0)])[:4]


def test_logprobs_are_reported() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    out = run_all(engine, {0: [Request("l", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, logprobs=3))]})
    lps = [lp for d in out[("l", 0)] for lp in (d.logprobs or [])]
    assert [lp.token_id for lp in lps] == tokens_of(out[("l", 0)])
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the best
        assert lp.logprob <= 0 and abs(lp.top[0][1] - lp.logprob) < 1e-6


def test_invalid_requests_are_refused_clearly() -> None:
    engine = make_engine(tiny_model("dense"))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(Request("v", [1, 999], GREEDY))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="prompt"):
        Request("e", [], GREEDY)


def test_priority_orders_admission() -> None:
    model = tiny_model("dense")
    engine = make_engine(model, max_num_seqs=1)
    engine.add_request(Request("late-free", [1, 2], GREEDY, priority=5))
    engine.add_request(Request("pro", [3, 4], GREEDY, priority=0))
    first = engine.scheduler.schedule()
    assert [i.seq.request.request_id for i in first.items] == ["pro"]


def test_long_prompt_is_chunked_and_does_not_stall_decodes() -> None:
    model = tiny_model("dense")
    engine = make_engine(model, max_batched_tokens=16)
    engine.add_request(Request("stream", [1, 2, 3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    engine.step()  # its prefill
    engine.add_request(Request("long", list(range(200)), GREEDY))
    for _ in range(10):  # 200 prompt tokens under a 16-token budget: many steps of prefill
        deltas = engine.step()
        assert any(d.request_id == "stream" and d.token_ids for d in deltas)
    long_seq = next(s for s in engine.scheduler.running if s.request.request_id == "long")
    assert 0 < long_seq.num_computed < 200


def test_sliding_window_releases_blocks() -> None:
    model = tiny_model("sliding_window")  # window 12, blocks of 4
    engine = make_engine(model)
    engine.add_request(Request("w", [1, 2, 3], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)))
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, engine.blocks.num_used)
    # 123 tokens would need 31 blocks; the window keeps only ~12/4 + 2 alive.
    assert peak <= 6
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_counters() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    run_all(engine, {0: [Request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts(3))]})
    s = engine.stats
    assert s.prompt_tokens == sum(len(p) for p in prompts(3))
    assert s.generation_tokens == 36 and s.requests_finished == 3
    assert s.time_to_first_token.count == 3 and s.inter_token_latency.count == 33
    assert s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}


def test_grammar_constrains_every_sample() -> None:
    import json

    from souverain.engine.grammar import GrammarCompiler

    model = tiny_model("dense")  # random weights: left alone it writes noise
    engine = make_engine(model)
    grammar = GrammarCompiler(engine.tokenizer, model.args.vocab_size).json_schema(SCHEMA)
    params = SamplingParams(temperature=1.0, max_tokens=200, seed=5, n=2)
    free = SamplingParams(temperature=1.0, max_tokens=20, seed=5)
    requests = [Request(f"j{i}", p, params, grammar=grammar) for i, p in enumerate(prompts(4))]
    out = run_all(engine, {0: [*requests, Request("free", [1, 2, 3], free)], 2: [Request("late", [4], params,
                                                                                         grammar=grammar)]})
    for rid in [*(f"j{i}" for i in range(4)), "late"]:
        for index in range(2):
            deltas = out[(rid, index)]
            value = json.loads(text_of(deltas))
            assert set(value) == {"n", "tag"} and 0 <= value["n"] <= 9 and value["tag"] in "ab", value
            # The grammar's end ends the answer: no EOS step, no trailing text.
            assert deltas[-1].finish_reason is FinishReason.STOP and EOS not in tokens_of(deltas)
    assert len(tokens_of(out[("free", 0)])) == 20  # an unconstrained neighbour is left alone


def test_grammar_cut_by_max_tokens_says_length() -> None:
    from souverain.engine.grammar import GrammarCompiler

    model = tiny_model("dense")
    engine = make_engine(model)
    grammar = GrammarCompiler(engine.tokenizer, model.args.vocab_size).json_schema(SCHEMA)
    out = run_all(engine, {0: [Request("cut", [1, 2], SamplingParams(temperature=0.0, max_tokens=4),
                                       grammar=grammar)]})
    deltas = out[("cut", 0)]
    assert deltas[-1].finish_reason is FinishReason.LENGTH and text_of(deltas).startswith("{")


def test_any_integer_seed_works_and_nothing_is_half_added() -> None:
    model = tiny_model("dense")
    engine = make_engine(model)
    for i, seed in enumerate((-5, 1 << 64, 0)):
        engine.add_request(Request(f"s{i}", [1, 2], SamplingParams(max_tokens=3, seed=seed)))
    out = run_all(engine)
    assert all(len(tokens_of(out[(f"s{i}", 0)])) >= 1 for i in range(3))


def test_huge_top_k_is_the_whole_vocabulary() -> None:
    """Found by fuzzing the API: a top_k beyond int64 once failed the engine step."""
    model = tiny_model("dense")
    e = make_engine(model)
    r = Request("r", list(b"hi"), SamplingParams(max_tokens=3, temperature=0, top_k=10**30))
    plain = Request("p", list(b"hi"), SamplingParams(max_tokens=3, temperature=0))
    out = run_all(e, {0: [r, plain]})
    assert tokens_of(out[("r", 0)]) == tokens_of(out[("p", 0)])


def test_tenants_of_one_priority_are_admitted_round_robin_under_their_caps() -> None:
    model = tiny_model("dense")
    engine = make_engine(model, max_num_seqs=6)
    for i in range(8):  # one tenant's backlog, queued first
        engine.add_request(Request(f"flood{i}", [1, 2 + i], GREEDY, tenant="org:1", tenant_max_running=4))
    engine.add_request(Request("a", [3, 4], GREEDY, tenant="org:2"))
    engine.add_request(Request("b", [5, 6], GREEDY, tenant="org:3"))
    batch = engine.scheduler.schedule()
    order = [i.seq.request.tenant or i.seq.request.request_id for i in batch.items]
    # Round-robin: the later tenants come right after the flood's first, not after its backlog; the flood
    # runs at most 4 though 6 slots were free.
    assert order[:3] == ["org:1", "org:2", "org:3"] and order.count("org:1") == 4
    out = run_all(engine)
    assert len(out) == 10
