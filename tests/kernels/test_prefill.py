"""The AMX causal attention of fresh prefill chunks (prefill.cpp) against PyTorch's, and in the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.engine.request import Request, SamplingParams
from souverain.model import ModelArgs, Transformer
from tests.engine.toy import make_engine, run_all, tokens_of

fast = kernels.load()
pytestmark = pytest.mark.skipif(fast is None or not fast.amx_available(),
                                reason="no AMX here (or no compiler): fresh chunks keep PyTorch's attention")
# Spans of one row, under, at and over a 32-row block, several blocks and a partial last one.
SPANS = [(0, 1), (1, 17), (18, 32), (50, 33), (83, 200), (300, 64)]


def qkv(n: int, heads: int, kv_heads: int, hd: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    return tuple(torch.randn(n, h, hd).to(torch.bfloat16) for h in (heads, kv_heads, kv_heads))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Causal attention of each span's rows among themselves, in fp32."""
    out = torch.zeros(q.shape)
    for row, n in spans:
        a, b, c = (t[row : row + n].float().transpose(0, 1)[None] for t in (q, k, v))
        out[row : row + n] = F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (2, 1, 256)])
@torch.inference_mode()
def test_prefill_attention_is_causal_attention(heads: int, kv_heads: int, hd: int) -> None:
    assert fast is not None
    q, k, v = qkv(400, heads, kv_heads, hd)
    out = torch.full_like(q, 7.0)
    fast.prefill_attention(q, k, v, out, SPANS, hd**-0.5)
    want = reference(q, k, v, SPANS)
    rows = torch.cat([torch.arange(r, r + n) for r, n in SPANS])
    # bf16 probabilities and outputs, as PyTorch's bf16 flash attention: within a few bf16 steps.
    err = (out[rows].float() - want[rows]).abs()
    assert (err <= want[rows].abs() / 64 + 2e-2).all(), err.max().item()
    outside = torch.ones(400, dtype=torch.bool)
    outside[rows] = False
    assert (out[outside] == 7.0).all()  # rows of no span are left as they were


@torch.inference_mode()
def test_a_span_does_not_depend_on_the_others() -> None:
    """Each sequence is computed alone whatever shares the step: batched equals alone, to the bit."""
    assert fast is not None
    q, k, v = qkv(400, 9, 3, 64, seed=1)
    together = torch.empty_like(q)
    fast.prefill_attention(q, k, v, together, SPANS, 0.125)
    for row, n in SPANS:
        alone = torch.empty(n, 9, 64, dtype=torch.bfloat16)
        fast.prefill_attention(q[row : row + n], k[row : row + n], v[row : row + n], alone, [(0, n)], 0.125)
        assert torch.equal(alone, together[row : row + n])


@torch.inference_mode()
def test_rows_may_lie_apart() -> None:
    """q, k and v as slices of one fused projection output (rows wider than their heads)."""
    assert fast is not None
    torch.manual_seed(2)
    fused = torch.randn(100, (4 + 2 + 2) * 32).to(torch.bfloat16)
    q, k, v = (t.view(100, -1, 32) for t in fused.split([128, 64, 64], dim=1))
    out = torch.empty(100, 4, 32, dtype=torch.bfloat16)
    fast.prefill_attention(q, k, v, out, [(0, 60), (60, 40)], 32**-0.5)
    want = reference(q.contiguous(), k.contiguous(), v.contiguous(), [(0, 60), (60, 40)])
    assert ((out.float() - want).abs() <= want.abs() / 64 + 2e-2).all()


def test_bad_input_is_refused() -> None:
    assert fast is not None
    q, k, v = qkv(10, 4, 2, 32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="outside the 10 rows"):
        fast.prefill_attention(q, k, v, out, [(5, 6)], 1.0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fast.prefill_attention(q.float(), k, v, out, [(0, 10)], 1.0)
    assert not fast.prefill_supported(4, 3, 32) and not fast.prefill_supported(4, 2, 48)


def test_engine_prefill_matches_the_plain_forward_and_is_batch_invariant() -> None:
    """A bf16 model whose shapes the kernel takes: the first token after each prompt is the plain
    (no cache) forward's argmax, and greedy outputs batched with others equal each request alone."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=258,
                                  max_seq_len=512, head_dim=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.to(torch.bfloat16).eval()
    calls = []
    real = fast.prefill_attention  # type: ignore[union-attr]

    def counted(*args: object) -> None:
        calls.append(args[4])
        real(*args)

    prompts = [[(11 * i + 3 * j) % 250 for j in range(3 + 37 * i)] for i in range(5)]  # 3 to 151 tokens
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(batch: list[int]) -> dict[int, list[int]]:
        engine = make_engine(model, blocks=512, block_size=16, max_batched_tokens=512)
        out = run_all(engine, {0: [Request(f"r{i}", prompts[i], params) for i in batch]})
        return {i: tokens_of(out[(f"r{i}", 0)]) for i in batch}

    kernels._state["cpu"] = type("Counted", (), {"__getattr__": lambda self, n: counted if n == "prefill_attention"
                                                 else getattr(fast, n)})()
    try:
        together = run(list(range(5)))
    finally:
        kernels._state["cpu"] = fast
    assert any(len(spans) == 5 for spans in calls)  # all five prompts' first chunks in one call
    for i in range(5):
        assert run([i])[i] == together[i]
        with torch.inference_mode():
            logits = model(torch.tensor([prompts[i]]), torch.arange(len(prompts[i]))[None])
        assert together[i][0] == int(logits[0, -1].float().argmax())
