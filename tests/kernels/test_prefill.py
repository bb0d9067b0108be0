"""The causal attention of prompt chunks (prefill.cpp) against PyTorch's, and in the engine: on AMX tiles and with
the same products on AVX-512 BF16, each where this CPU has it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.engine.request import Request, SamplingParams
from souverain.kernels.backend import Backend
from souverain.model import ModelArgs, Transformer
from tests.engine.toy import make_engine, run_all, tokens_of

fast = kernels.load()
# prefill.cpp's products: 1024 AMX tiles, 512 AVX-512 BF16 (vdpbf16ps), with the backend that uses each.
BACKENDS = {1024: "amx", 512: "avx512"}
ISAS = [isa for isa in BACKENDS if fast is not None and fast.prefill_supported(9, 3, 64, isa)]
pytestmark = pytest.mark.skipif(not ISAS, reason="neither AMX nor AVX-512 BF16 here (or no compiler): prompt "
                                "tokens attend through the vector kernel")
on_each = pytest.mark.parametrize("isa", ISAS)
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


@on_each
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (2, 1, 256)])
@torch.inference_mode()
def test_prefill_attention_is_causal_attention(heads: int, kv_heads: int, hd: int, isa: int) -> None:
    assert fast is not None
    q, k, v = qkv(400, heads, kv_heads, hd)
    out = torch.full_like(q, 7.0)
    fast.prefill_attention(q, k, v, out, SPANS, hd**-0.5, isa)
    want = reference(q, k, v, SPANS)
    rows = torch.cat([torch.arange(r, r + n) for r, n in SPANS])
    # bf16 probabilities and outputs, as PyTorch's bf16 flash attention: within a few bf16 steps.
    err = (out[rows].float() - want[rows]).abs()
    assert (err <= want[rows].abs() / 64 + 2e-2).all(), err.max().item()
    outside = torch.ones(400, dtype=torch.bool)
    outside[rows] = False
    assert (out[outside] == 7.0).all()  # rows of no span are left as they were


@on_each
@torch.inference_mode()
def test_a_span_does_not_depend_on_the_others(isa: int) -> None:
    """Each sequence is computed alone whatever shares the step: batched equals alone, to the bit."""
    assert fast is not None
    q, k, v = qkv(400, 9, 3, 64, seed=1)
    together = torch.empty_like(q)
    fast.prefill_attention(q, k, v, together, SPANS, 0.125, isa)
    for row, n in SPANS:
        alone = torch.empty(n, 9, 64, dtype=torch.bfloat16)
        fast.prefill_attention(q[row : row + n], k[row : row + n], v[row : row + n], alone, [(0, n)], 0.125, isa)
        assert torch.equal(alone, together[row : row + n])


@on_each
@torch.inference_mode()
def test_rows_may_lie_apart(isa: int) -> None:
    """q, k and v as slices of one fused projection output (rows wider than their heads)."""
    assert fast is not None
    torch.manual_seed(2)
    fused = torch.randn(100, (4 + 2 + 2) * 32).to(torch.bfloat16)
    q, k, v = (t.view(100, -1, 32) for t in fused.split([128, 64, 64], dim=1))
    out = torch.empty(100, 4, 32, dtype=torch.bfloat16)
    fast.prefill_attention(q, k, v, out, [(0, 60), (60, 40)], 32**-0.5, isa)
    want = reference(q.contiguous(), k.contiguous(), v.contiguous(), [(0, 60), (60, 40)])
    assert ((out.float() - want).abs() <= want.abs() / 64 + 2e-2).all()


def paged(keys: torch.Tensor, values: torch.Tensor, bs: int, blocks: int, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """keys/values [S, Hkv, hd] written into a random cache of `blocks` blocks (k transposed, as the
    engine's), at blocks in shuffled order; the rest of the cache random. Returns k, v and the table."""
    s, hkv, hd = keys.shape
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(blocks, hkv, hd, bs, generator=gen).to(torch.bfloat16)
    vc = torch.randn(blocks * bs, hkv, hd, generator=gen).to(torch.bfloat16)
    table = torch.randperm(blocks, generator=gen)[: (s + bs - 1) // bs].tolist()
    for p in range(s):
        b, o = table[p // bs], p % bs
        kc[b, :, :, o] = keys[p]
        vc[b * bs + o] = values[p]
    return kc, vc, table


@on_each
@pytest.mark.parametrize("heads,kv_heads,hd,bs", [(9, 3, 64, 16), (4, 4, 32, 32), (8, 2, 128, 16)])
@torch.inference_mode()
def test_cached_prefill_attention_reads_the_paged_cache(heads: int, kv_heads: int, hd: int, bs: int, isa: int) -> None:
    """Chunks continuing their sequences: (row, cached keys, rows), every key from the cache."""
    assert fast is not None
    chunks = [(0, 24, 1), (1, 5, 40), (41, 300, 100), (141, 31, 33)]
    n = 174
    q = qkv(n, heads, kv_heads, hd, seed=5)[0]
    out = torch.full_like(q, 7.0)
    tables, caches, want = [], [], torch.zeros(q.shape)
    for i, (row, start, count) in enumerate(chunks):
        keys, values = qkv(start + count, kv_heads, kv_heads, hd, seed=10 + i)[1:]
        kc, vc, table = paged(keys, values, bs, 64, seed=i)
        caches.append((kc, vc))
        tables.append(table)
        allowed = torch.arange(start + count)[None] <= start + torch.arange(count)[:, None]
        a, b, c = (t.float().transpose(0, 1)[None] for t in (q[row : row + count], keys, values))
        want[row : row + count] = F.scaled_dot_product_attention(a, b, c, attn_mask=allowed,
                                                                  enable_gqa=True)[0].transpose(0, 1)
    for i, (row, start, count) in enumerate(chunks):  # one cache per chunk here: one call each
        kc, vc = caches[i]
        fast.prefill_attention_cached(q, kc, vc, out, [(row, start, count)],
                                      torch.tensor([tables[i]], dtype=torch.int32), bs, hd**-0.5, isa)
    err = (out.float() - want).abs()
    assert (err <= want.abs() / 64 + 2e-2).all(), err.max().item()
    # Several chunks in one call, over one cache, give the same bits as each alone.
    kc, vc = caches[2]
    width = len(tables[2])
    both = torch.empty_like(q)
    spans = [(41, 300, 100), (0, 10, 41)]
    fast.prefill_attention_cached(q, kc, vc, both, spans, torch.tensor([tables[2], tables[2][:4] + [0] * (width - 4)],
                                                                       dtype=torch.int32), bs, hd**-0.5, isa)
    assert torch.equal(both[41:141], out[41:141])


@on_each
def test_bad_input_is_refused(isa: int) -> None:
    assert fast is not None
    q, k, v = qkv(10, 4, 2, 32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="outside the 10 rows"):
        fast.prefill_attention(q, k, v, out, [(5, 6)], 1.0, isa)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fast.prefill_attention(q.float(), k, v, out, [(0, 10)], 1.0, isa)
    assert not fast.prefill_supported(4, 3, 32, isa) and not fast.prefill_supported(4, 2, 48, isa)
    with pytest.raises(RuntimeError, match="not supported here"):  # an isa that is neither
        fast.prefill_attention(q, k, v, out, [(0, 10)], 1.0, 256)
    kc, vc, table = paged(k, v, 16, 4, seed=0)
    t = torch.tensor([table], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="past its block table"):
        fast.prefill_attention_cached(q, kc, vc, out, [(0, 10, 10)], t, 16, 1.0, isa)
    with pytest.raises(RuntimeError, match="not in the cache"):
        fast.prefill_attention_cached(q, kc, vc, out, [(0, 0, 10)], torch.tensor([[9]], dtype=torch.int32), 16, 1.0,
                                      isa)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        fast.prefill_attention_cached(q, kc, vc, out, [(0, 0, 10)], t, 8, 1.0, isa)


@pytest.mark.skipif(len(ISAS) < 2, reason="AMX and AVX-512 BF16 both: an AMX CPU")
@torch.inference_mode()
def test_the_vector_products_agree_with_the_tiles() -> None:
    """The same algorithm on AVX-512 BF16 as on AMX: the outputs within bf16 rounding of each other."""
    assert fast is not None
    q, k, v = qkv(400, 9, 3, 64, seed=3)
    tiles, vector = torch.empty_like(q), torch.empty_like(q)
    fast.prefill_attention(q, k, v, tiles, SPANS, 0.125, 1024)
    fast.prefill_attention(q, k, v, vector, SPANS, 0.125, 512)
    rows = torch.cat([torch.arange(r, r + n) for r, n in SPANS])
    assert ((tiles[rows].float() - vector[rows].float()).abs() <= tiles[rows].float().abs() / 128 + 1e-2).all()


@on_each
def test_engine_prefill_matches_the_plain_forward_and_is_batch_invariant(isa: int) -> None:
    """A bf16 model whose shapes the kernel takes: the first token after each prompt is the plain
    (no cache) forward's argmax, and greedy outputs batched with others, or with the prompts split
    over steps, equal each request alone."""
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

    def run(batch: list[int], budget: int = 512) -> dict[int, list[int]]:
        engine = make_engine(model, blocks=512, block_size=16, max_batched_tokens=budget, backend=counting)
        out = run_all(engine, {0: [Request(f"r{i}", prompts[i], params) for i in batch]})
        return {i: tokens_of(out[(f"r{i}", 0)]) for i in batch}

    def counted_cached(*args: object) -> None:
        cached.append(args[4])
        real_cached(*args)

    cached: list[object] = []
    real_cached = fast.prefill_attention_cached  # type: ignore[union-attr]
    names = {"prefill_attention": counted, "prefill_attention_cached": counted_cached}
    ops = type("Counted", (), {"__getattr__": lambda self, n: names.get(n) or getattr(fast, n)})()
    counting = Backend(BACKENDS[isa], ops)
    together = run(list(range(5)))
    chunked = run(list(range(5)), budget=64)  # prompts split over steps: chunks continuing from the cache
    counting = Backend(BACKENDS[isa], fast)
    # Every query attends from the cache (the step's keys stored first): all five prompts' first chunks in
    # one call; the chunked run's later chunks read the keys cached before them.
    assert any(len(spans) == 5 and all(start == 0 for _, start, _ in spans) for spans in cached)
    assert any(start > 0 and n > 1 for spans in cached for _, start, n in spans)
    assert not calls
    # Each query's keys are taken in the same blocks whatever the chunking: the same tokens, to the bit.
    assert chunked == together
    for i in range(5):
        assert run([i])[i] == together[i]
        with torch.inference_mode():
            logits = model(torch.tensor([prompts[i]]), torch.arange(len(prompts[i]))[None])
        assert together[i][0] == int(logits[0, -1].float().argmax())
