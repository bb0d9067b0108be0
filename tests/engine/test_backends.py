"""The engine on each kernel backend this machine runs, the backend handed in by argument."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from souverain import kernels
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.engine.request import Request, SamplingParams
from souverain.engine.simple import generate_tokens
from souverain.kernels.backend import available, choose
from souverain.model import ModelArgs, Transformer
from souverain.model.quant import QuantLinear, prepare, quantize
from tests.engine.toy import EOS, ByteTokenizer, make_engine, run_all, tokens_of

HERE = available(kernels.load())
ROOT = Path(__file__).resolve().parents[2]
# Shapes every kernel takes: head_dim 32, sides in multiples of 32 (the output projection too), a 4:1 GQA.
SHAPED = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=256, vocab_size=288, max_seq_len=512,
              head_dim=32)


def int4_model(seed: int = 0, window: int | None = None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**SHAPED, sliding_window=window))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return quantize(model.eval(), bits=4)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.choice([1, 5, 17, 40, 90]))] for _ in range(n)]


# AMX and torch compute wide steps (prefill, many streams) with another arithmetic than narrow ones (AMX:
# bf16 activations in its tiles, int8 ones in q4_linear; torch: its bf16 copy, its int4 kernel): a row's
# result depends on its batch there, so its tokens may part from the simple loop's after a near-tie.
# test_gemm.py and test_prefill.py hold AMX to its references, the forced-backend test below torch.
@pytest.mark.parametrize("name", [n for n in HERE if n in ("avx512", "avx2")])
@pytest.mark.parametrize("window", [None, 24])
def test_each_backend_gives_the_simple_loops_tokens(name: str, window: int | None) -> None:
    """int4 weights packed for the backend; batched, chunked (budget 48) and preempted (12 blocks): on these
    backends every product of a row is the same whatever the batch, so the tokens are the simple loop's."""
    model = int4_model(window=window)
    engine = make_engine(model, blocks=12, block_size=16, max_batched_tokens=48, backend=choose(name=name))
    assert engine.backend.name == name
    ps = prompts(6, seed=len(name))
    params = SamplingParams(temperature=0.0, max_tokens=24)
    out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(ps[:4])],
                           3: [Request(f"r{i}", p, params) for i, p in enumerate(ps[4:], start=4)]})
    assert engine.stats.preemptions > 0
    for i, p in enumerate(ps):
        same_or_tie(model, p, tokens_of(out[(f"r{i}", 0)]), list(generate_tokens(model, p, max_tokens=24,
                                                                                  stop_ids=[EOS])))


def same_or_tie(model: Transformer, prompt: list[int], got: list[int], want: list[int]) -> None:
    """got is want, or parts from it where want's next token was a near-tie: the simple loop attends in fp32
    (SDPA over its contiguous cache), the engine's PyTorch path in float64 (this toy model is fp32, which the
    C++ attention does not take), so a last bit can differ, and bf16 activations carry it to the logits (seen:
    2.935 against 2.921 with a sliding window). The products are the same bits either way (test_q4.py)."""
    if got == want:
        return
    k = next((j for j in range(min(len(got), len(want))) if got[j] != want[j]), None)
    assert k is not None, (got, want)  # one stopped where the other went on: no tie explains it
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + want[:k]]))[0, -1].float()
    top = logits.topk(2)
    assert float(top.values[0] - top.values[1]) < 0.05 and got[k] in top.indices.tolist(), (k, got, want)


def test_two_engines_on_different_backends_in_one_process() -> None:
    """Each engine gets its backend by argument: no process-wide switch. AVX2 and AVX-512 compute the
    same integer sums and the same fp32 steps for generated tokens; where the CPU has AVX-512 BF16, avx512's
    prompt tokens take the bf16 product instead (QuantLinear.prompt_bf16), else every token agrees too."""
    names = [n for n in HERE if n in ("avx512", "avx2")] or ["torch"]
    names = [*names, "torch"] if len(names) == 1 else names
    engines = {n: make_engine(int4_model(), block_size=16, backend=choose(name=n)) for n in names}
    ps = prompts(5, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    for n, engine in engines.items():
        for i, p in enumerate(ps):
            engine.add_request(Request(f"{n}{i}", p, params))
    out: dict[str, list] = {}
    while any(e.has_unfinished() for e in engines.values()):
        for engine in engines.values():  # interleaved, step by step
            for d in engine.step():
                out.setdefault(d.request_id, []).append(d)
    got = {n: [tokens_of(out[f"{n}{i}"]) for i in range(len(ps))] for n in names}
    for n, engine in engines.items():
        isas = {m.backend.q4_isa for m in engine.model.modules() if isinstance(m, QuantLinear) and m.codes is not None}
        assert isas == ({512} if n == "avx512" else {256} if n == "avx2" else set())
        for i, p in enumerate(ps):
            same_or_tie(engine.model, p, got[n][i], list(generate_tokens(engine.model, p, max_tokens=16,
                                                                         stop_ids=[EOS])))
    bf16_prompts = "avx512" in engines and any(
        isinstance(m, QuantLinear) and m.prompt_bf16 for m in engines["avx512"].model.modules())
    if set(names) == {"avx512", "avx2"} and not bf16_prompts:
        assert got["avx512"] == got["avx2"]


def test_an_engine_refuses_a_model_packed_for_another_backend() -> None:
    if len(HERE) < 2:
        pytest.skip("one backend here")
    first, other = choose(name=HERE[0]), choose(name=HERE[1])
    model = prepare(int4_model(), first)
    with pytest.raises(ValueError, match=f"packed for {first.name}, not {other.name}"):
        LLMEngine(model, ByteTokenizer(), EngineConfig(kv_cache_memory=1 << 20), backend=other)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=f"packed for {first.name} already"):
        prepare(model, other)


@pytest.mark.parametrize("name", HERE)
def test_int8_values_by_default_where_prompts_prefill_on_the_tiles(name: str) -> None:
    """The values' int8 copy (EngineConfig.int8_values): by default where prompt tokens attend on the tiles'
    products (AMX, AVX-512 BF16: they read the bf16 values); asked for, wherever the C++ decode kernel runs; an
    error where it cannot (PyTorch ops, fp32 models), and its memory counted in the cache's blocks."""
    backend = choose(name=name)
    bf16 = int4_model().to(torch.bfloat16)
    auto = make_engine(bf16, block_size=16, backend=backend)
    assert (auto.cache.v8 is not None) == bool(auto.cache.tiles)
    if backend.ops is None:
        with pytest.raises(ValueError, match="int8 KV values need the C\\+\\+ decode kernel"):
            make_engine(int4_model().to(torch.bfloat16), block_size=16, backend=backend, int8_values=True)
        return
    on = make_engine(int4_model().to(torch.bfloat16), block_size=16, backend=backend, int8_values=True)
    off = make_engine(int4_model().to(torch.bfloat16), block_size=16, backend=backend, int8_values=False)
    assert on.cache.v8 is not None and on.cache.v_scale is not None and off.cache.v8 is None
    # 2 layers x 16 slots x 2 kv heads: 2 x 32 bf16 values (K and V) against 2 x 32 + 32 + 4 bytes.
    assert on.cache.num_blocks == off.cache.num_blocks * 128 // 164
    with pytest.raises(ValueError, match="int8 KV values need"):
        make_engine(int4_model(), block_size=16, backend=backend, int8_values=True)  # an fp32 model
    ps = prompts(4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    outs = []
    for engine in (on, off):
        out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(ps)]})
        outs.append([tokens_of(out[(f"r{i}", 0)]) for i in range(len(ps))])
    assert all(len(t) > 0 for t in outs[0])
    assert bool(on.cache.v8.any()) and bool(on.cache.v_scale.any())  # written by store_kv as the steps ran


@pytest.mark.parametrize("name", [n for n in ("avx512", "avx2", "torch") if n in HERE])
def test_forced_backends_pass_the_engine_greedy_equality_tests(name: str) -> None:
    """SOUVERAIN_KERNELS=name, then the engine tests that compare batched, preempted, chunked and
    prefix-cached generation with the simple loop (tests/engine/test_engine.py), in a fresh process."""
    cases = "equals_alone or preemption or prefix_cache or chunked or seed_reproduces or n_samples"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", cases,
                           "tests/engine/test_engine.py"], cwd=ROOT, env={**os.environ, "SOUVERAIN_KERNELS": name},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
