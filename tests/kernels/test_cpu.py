"""The C++ kernels against the PyTorch ops they replace, and the engine on them against the plain path."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.engine.request import Request, SamplingParams
from souverain.engine.simple import generate_tokens
from souverain.kernels.backend import TORCH, Backend, available, choose
from souverain.model import ModelArgs, Transformer
from souverain.model.attention import attend
from souverain.model.layers import RMSNorm, add, silu_mul
from souverain.model.rope import apply_rope
from tests.engine.toy import EOS, make_engine, run_all, tokens_of

fast = kernels.load()
pytestmark = pytest.mark.skipif(fast is None, reason="no C++ compiler here: the PyTorch ops serve")
DTYPES = [torch.float32, torch.bfloat16]


def random_norm(dtype: torch.dtype) -> RMSNorm:
    """SmolLM2's RMSNorm (dim 576) with random weights (from the caller's seed)."""
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_the_residual_add_and_its_norm_are_the_separate_ops(dtype: torch.dtype) -> None:
    """add_rows is ATen's add to the bit; add_rms_norm is that sum and rms_norm of it, to the bit."""
    torch.manual_seed(1)
    norm = random_norm(dtype)
    for rows in (1, 7, 300):  # 300 rows take the threaded path
        x, r = (torch.randn(rows, 576) * 3).to(dtype), (torch.randn(rows, 576) * 5).to(dtype)
        assert torch.equal(add(x, r, fast), x + r)
        h, normed = norm.add_forward(x, r, fast)
        assert torch.equal(h, x + r) and torch.equal(normed, norm(x + r, fast))
        # Strided inputs (a narrowed view) are read as they are.
        wide = (torch.randn(rows, 1152) * 3).to(dtype)
        assert torch.equal(add(wide[:, :576], r, fast), wide[:, :576] + r)
    with pytest.raises(RuntimeError, match="one shape"):
        fast.add_rows(torch.zeros(2, 64, dtype=dtype), torch.zeros(3, 64, dtype=dtype))
    with pytest.raises(RuntimeError, match="weight"):
        zeros = torch.zeros(2, 64, dtype=dtype)
        fast.add_rms_norm(zeros, zeros, torch.ones(32, dtype=dtype), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_rms_norm_rounds_as_the_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = random_norm(dtype)
    for rows in (1, 32, 300):  # 300 rows take the threaded path
        x = (torch.randn(rows, 576) * 3).to(dtype)
        got, want = norm(x, fast), norm(x)  # the kernel, the PyTorch ops
        # The sum of squares is added in another order: the scale may differ in its last bit.
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # which moves a rare value across a bf16 rounding boundary: one step, no more
            assert ((got.float() - want.float()).abs() <= want.float().abs() / 128 + 1e-30).all()
            assert (got == want).float().mean().item() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_swiglu_and_silu_mul_are_exact(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for rows in (1, 7, 64):  # 64 x 1536 is past the inline limit: threaded
        gu = (torch.randn(rows, 2 * 1536) * 4).to(dtype)
        gate, up = gu.chunk(2, dim=-1)
        want = F.silu(gate) * up
        assert torch.equal(fast.swiglu(gu), want)
        assert torch.equal(silu_mul(gate.contiguous(), up.contiguous(), fast), want)
        assert torch.equal(silu_mul(gate, up), want)
    odd = torch.randn(3, 2 * 37).to(dtype)  # a length with a scalar tail
    assert torch.equal(fast.swiglu(odd), F.silu(odd[:, :37]) * odd[:, 37:])


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_rope_is_exact(dtype: torch.dtype) -> None:
    from souverain.model.rope import rope_cos_sin

    torch.manual_seed(0)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    positions = torch.randint(0, 4000, (2, 40))
    cos, sin = rope_cos_sin(inv, positions, dtype)
    x = torch.randn(2, 40, 9, 64).to(dtype)
    assert torch.equal(apply_rope(x, cos, sin, fast), apply_rope(x, cos, sin))


def paged_case(n: int, h: int, hkv: int, hd: int, bs: int, dtype: torch.dtype, window: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 300, (n,), generator=g)]
    per_seq = [(length + bs - 1) // bs for length in lengths]
    num_blocks = sum(per_seq) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered through the pool
    tables, k = [], 0
    for count in per_seq:
        tables.append(order[k : k + count])
        k += count
    width = max(per_seq)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    keys = torch.randn(num_blocks * bs, hkv, hd, generator=g).to(dtype)
    values = torch.randn(num_blocks * bs, hkv, hd, generator=g).to(dtype)
    q = torch.randn(n, h, hd, generator=g).to(dtype)
    hi = torch.tensor(lengths, dtype=torch.int32)
    lo = (hi - window).clamp(min=0) if window else torch.zeros_like(hi)
    return q, keys, values, table, lo, hi, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "hkv", "hd", "window"), [(9, 3, 64, None), (8, 8, 128, None), (32, 8, 64, 50),
                                                        (4, 1, 32, 17)])
@torch.inference_mode()
def test_paged_decode_attention_matches_sdpa(dtype: torch.dtype, h: int, hkv: int, hd: int,
                                             window: int | None) -> None:
    bs = 16
    assert fast.decode_supported(h, hkv, hd, bs)
    q, keys, values, table, lo, hi, tables = paged_case(12, h, hkv, hd, bs, dtype, window, seed=h + hd)
    # The kernel's key layout: [blocks, Hkv, hd, bs].
    k_tiles = keys.view(-1, bs, hkv, hd).permute(0, 2, 3, 1).contiguous()
    got = fast.paged_decode_attention(q, k_tiles, values, table, lo, hi, bs, hd**-0.5)
    for s, blocks in enumerate(tables):
        slots = torch.tensor([b * bs + o for b in blocks for o in range(bs)])[int(lo[s]) : int(hi[s])]
        everything = torch.ones(1, 1, 1, len(slots), dtype=torch.bool)
        want = attend(q[s][None, None], keys[slots][None], values[slots][None], everything)[0, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[s].float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "hkv", "window"), [(9, 3, None), (8, 2, 20), (16, 2, None)])
@torch.inference_mode()
def test_prefill_rows_get_a_lone_query_bits(dtype: torch.dtype, h: int, hkv: int, window: int | None) -> None:
    """A prompt's rows attended together (runs of rows sharing the key loads) get, to the bit, what each
    row gets alone (a decode of that position), in any chunking and beside other sequences' rows."""
    bs, hd = 16, 64
    _, keys, values, table, _, _, _ = paged_case(3, h, hkv, hd, bs, dtype, window, seed=h)
    k_tiles = keys.view(-1, bs, hkv, hd).permute(0, 2, 3, 1).contiguous()
    n = 37  # sequence 0's positions 0 .. 36, then one decode row of sequence 1
    rows = torch.randn(n + 1, h, hd).to(dtype)
    pos = torch.tensor([*range(n), 5], dtype=torch.int32)
    hi = pos + 1
    lo = (hi - window).clamp(min=0) if window else torch.zeros_like(hi)
    tables = torch.cat([table[0:1].expand(n, -1), table[1:2]]).contiguous()
    alone = torch.cat([fast.paged_decode_attention(rows[i : i + 1], k_tiles, values, tables[i : i + 1], lo[i : i + 1],
                                                   hi[i : i + 1], bs, hd**-0.5) for i in range(n + 1)])
    for runs in ([(0, n)], [(0, 5), (5, 32)], [(3, 30)], []):
        got = fast.paged_decode_attention(rows, k_tiles, values, tables, lo, hi, bs, hd**-0.5, runs)
        assert torch.equal(got, alone), runs
    with pytest.raises(RuntimeError, match="one block table"):
        fast.paged_decode_attention(rows, k_tiles, values, tables, lo, hi, bs, hd**-0.5, [(30, 8)])


def int8_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of store_kv's int8 copy: each slot's head on a scale of max |v| / 127, ties to even."""
    v = values.float()
    top = v.abs().amax(-1)
    codes = (v * torch.where(top > 0, 127 / top, torch.zeros_like(top))[..., None]).round()
    return codes.to(torch.int8), top / 127


@pytest.mark.parametrize(("h", "hkv", "hd", "window"), [(9, 3, 64, None), (32, 8, 64, 50), (4, 1, 32, 17),
                                                        (8, 8, 128, None)])
@torch.inference_mode()
def test_int8_values_attend_as_their_dequantised_bf16(h: int, hkv: int, hd: int, window: int | None) -> None:
    """paged_decode_attention on the int8 copy: the reference attention over the codes times their scales, as
    closely as bf16 values match theirs; and still a lone query's bits in any run of rows."""
    bs = 16
    q, keys, values, table, lo, hi, tables = paged_case(12, h, hkv, hd, bs, torch.bfloat16, window, seed=h + hd)
    values[7] = 0  # a slot whose heads are all zero: scale 0
    k_tiles = keys.view(-1, bs, hkv, hd).permute(0, 2, 3, 1).contiguous()
    codes, scales = int8_values(values)
    got = fast.paged_decode_attention(q, k_tiles, values, table, lo, hi, bs, hd**-0.5, v_int8=codes, v_scale=scales)
    plain = fast.paged_decode_attention(q, k_tiles, values, table, lo, hi, bs, hd**-0.5)
    dequantised = codes.float() * scales[..., None]
    for s, blocks in enumerate(tables):
        slots = torch.tensor([b * bs + o for b in blocks for o in range(bs)])[int(lo[s]) : int(hi[s])]
        everything = torch.ones(1, 1, 1, len(slots), dtype=torch.bool)
        want = attend(q[s][None, None].float(), keys[slots][None].float(), dequantised[slots][None], everything)[0, 0]
        torch.testing.assert_close(got[s].float(), want, atol=2e-2, rtol=2e-2)
    assert not torch.equal(got, plain)  # the copy was read
    # The int8 values' error is the codes' half step at most: within what bf16's own rounding of them allows.
    assert (got.float() - plain.float()).abs().max() < 0.05
    longest = int(hi.argmax())
    n = min(20, int(hi[longest]))  # a run of the longest sequence's last n positions
    rows = torch.randn(n, h, hd).to(torch.bfloat16)
    pos = torch.arange(n, dtype=torch.int32) + int(hi[longest]) - n
    run_hi, run_lo = pos + 1, ((pos + 1 - window).clamp(min=0) if window else torch.zeros_like(pos))
    run_tables = table[longest : longest + 1].expand(n, -1).contiguous()
    alone = torch.cat([fast.paged_decode_attention(rows[i : i + 1], k_tiles, values, run_tables[i : i + 1],
                                                   run_lo[i : i + 1], run_hi[i : i + 1], bs, hd**-0.5,
                                                   v_int8=codes, v_scale=scales) for i in range(n)])
    together = fast.paged_decode_attention(rows, k_tiles, values, run_tables, run_lo, run_hi, bs, hd**-0.5, [(0, n)],
                                           v_int8=codes, v_scale=scales)
    assert n > 1 and torch.equal(together, alone)


def test_store_kv_writes_the_int8_values_of_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    blocks, bs, hkv, hd = 6, 16, 3, 64
    k_tiles = torch.zeros(blocks, hkv, hd, bs, dtype=torch.bfloat16)
    v_rows = torch.zeros(blocks * bs, hkv, hd, dtype=torch.bfloat16)
    codes = torch.zeros(blocks * bs, hkv, hd, dtype=torch.int8)
    scales = torch.zeros(blocks * bs, hkv)
    slots = torch.randperm(blocks * bs, generator=g)[:40]
    k = torch.randn(40, hkv, hd, generator=g).to(torch.bfloat16)
    v = (torch.randn(40, hkv, hd, generator=g) * torch.logspace(-3, 3, 40)[:, None, None]).to(torch.bfloat16)
    v[3, 1] = 0
    v[5, 0] = 0
    v[5, 0, :3] = torch.tensor([-2.0, 2.0, 1.0])  # ties: v * (127 / 2) = 63.5 rounds to 64 (even)
    fast.store_kv(k, v, k_tiles, v_rows, slots, v_int8=codes, v_scale=scales)
    want_codes, want_scales = int8_values(v)
    assert torch.equal(codes[slots], want_codes) and torch.equal(scales[slots], want_scales)
    assert torch.equal(v_rows[slots], v)  # the bf16 values too
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not codes[untouched].any() and not scales[untouched].any()
    with pytest.raises(RuntimeError, match="v_int8 and v_scale"):
        fast.store_kv(k, v, k_tiles, v_rows, slots, v_int8=codes)
    with pytest.raises(RuntimeError, match="int8 values"):
        fast.store_kv(k, v, k_tiles, v_rows, slots, v_int8=codes.float(), v_scale=scales)


def test_paged_decode_attention_refuses_bad_input() -> None:
    q, keys, values, table, lo, hi, _ = paged_case(2, 4, 2, 64, 16, torch.float32, None, seed=0)
    tiles = keys.view(-1, 16, 2, 64).permute(0, 2, 3, 1).contiguous()
    with pytest.raises(RuntimeError, match="int32"):
        fast.paged_decode_attention(q, tiles, values, table.long(), lo, hi, 16, 0.125)
    with pytest.raises(RuntimeError, match="empty key range"):
        fast.paged_decode_attention(q, tiles, values, table, hi, hi, 16, 0.125)
    with pytest.raises(RuntimeError, match="disagree"):
        fast.paged_decode_attention(q, tiles, values[:-16], table, lo, hi, 16, 0.125)


# -- the engine on the kernels ---------------------------------------------------------------------
KERNEL_SHAPED = dict(dim=192, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=256, vocab_size=258, max_seq_len=512)


def kernel_model(window: int | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**KERNEL_SHAPED, sliding_window=window))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.choice([1, 5, 17, 33, 70]))] for _ in range(n)]


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("blocks", [64, 12])  # 12 blocks of 16: preemption
def test_engine_on_kernels_equals_alone(window: int | None, blocks: int) -> None:
    model = kernel_model(window)
    engine = make_engine(model, blocks=blocks, block_size=16, max_batched_tokens=48)
    assert engine.cache.k_transposed  # the decode kernel serves this engine
    ps = prompts(6, seed=blocks)
    params = SamplingParams(temperature=0.0, max_tokens=30)
    out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(ps[:4])],
                           3: [Request(f"r{i}", p, params) for i, p in enumerate(ps[4:], start=4)]})
    if blocks == 12:
        assert engine.stats.preemptions > 0
    for i, p in enumerate(ps):
        # Alone: the contiguous cache and PyTorch's attention, no paged kernel.
        assert tokens_of(out[(f"r{i}", 0)]) == list(generate_tokens(model, p, max_tokens=30, stop_ids=[EOS])), i
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_engine_gives_the_same_tokens_without_kernels() -> None:
    ps = prompts(5, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20)

    def run(backend: Backend) -> tuple[list[list[int]], bool]:
        # Plain linears (the same products on both): the element-wise and attention kernels against
        # PyTorch's ops. Quantised products differ by backend (int8 activations on the C++ ones), and
        # tests/engine/test_backends.py holds each backend to its own reference.
        model = kernel_model(window=24)
        engine = make_engine(model, block_size=16, backend=backend)
        out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(ps)]})
        return [tokens_of(out[(f"r{i}", 0)]) for i in range(len(ps))], engine.cache.k_transposed

    with_kernels, used = run(choose(name="avx2" if "avx2" in available(fast) else "torch"))
    without, unused = run(TORCH)
    assert used and not unused
    assert with_kernels == without


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_where_the_reference_writes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    blocks, bs, hkv, hd = 6, 16, 3, 64
    k_tiles = torch.zeros(blocks, hkv, hd, bs, dtype=dtype)
    v_rows = torch.zeros(blocks * bs, hkv, hd, dtype=dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:40]
    k = torch.randn(40, hkv, hd, generator=g).to(dtype)
    v = torch.randn(40, hkv, hd, generator=g).to(dtype)
    fast.store_kv(k, v, k_tiles, v_rows, slots)
    assert torch.equal(k_tiles.permute(0, 3, 1, 2).reshape(-1, hkv, hd)[slots], k)
    assert torch.equal(v_rows[slots], v)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not k_tiles.permute(0, 3, 1, 2).reshape(-1, hkv, hd)[untouched].any()
    with pytest.raises(RuntimeError, match="slot out of range"):
        fast.store_kv(k[:1], v[:1], k_tiles, v_rows, torch.tensor([blocks * bs]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_argmax(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 49157, generator=g)  # a length with a scalar tail
    x[1, 7] = x[1, 9000] = 1e9  # ties: the first
    x[2, 12], x[2, 40000] = float("nan"), float("nan")  # NaN wins, the first
    x[3] = float("-inf")
    x[4, 49150] = 1e9  # the maximum in the scalar tail
    x[5, 5] = x[5, 20] = x[5, 49156] = 1e9  # ties in different lanes: the earlier one, not the lower lane
    x[6, 40000] = float("nan")  # the only NaN, late in the row
    x = x.to(dtype)  # bf16 rounding makes ties of its own
    assert torch.equal(fast.argmax_rows(x), x.argmax(-1))


def test_rope_and_store_kv_read_rows_sliced_from_a_fused_projection() -> None:
    """q, k, v are column slices of one [N, q + 2 kv] output: rows lie apart, no copy is made."""
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(20, 9 * 64 + 2 * 3 * 64, generator=g).to(torch.bfloat16)
    q, k, v = fused.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q3, k3, v3 = q.view(20, 9, 64), k.view(20, 3, 64), v.view(20, 3, 64)
    assert not q3.is_contiguous()
    cos, sin = torch.randn(20, 64, generator=g).to(torch.bfloat16), torch.randn(20, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(fast.rope(q3, cos, sin), fast.rope(q3.contiguous(), cos, sin))
    tiles, rows = torch.zeros(2, 3, 64, 16, dtype=torch.bfloat16), torch.zeros(32, 3, 64, dtype=torch.bfloat16)
    slots = torch.arange(20)
    fast.store_kv(k3, v3, tiles, rows, slots)
    assert torch.equal(tiles.permute(0, 3, 1, 2).reshape(-1, 3, 64)[:20], k3)
    assert torch.equal(rows[:20], v3)
