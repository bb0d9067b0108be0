"""q4_linear and q8_linear (souverain/kernels/q4.cpp) against the PyTorch reference of the same arithmetic,
at the shapes of SmolLM2, Mistral 7B and a GQA 4:1 model, for each instruction set this CPU runs (1024: AMX
tiles beyond 4 rows, AVX-512 VNNI up to 4; 512; 256), with x read to 11 bits (two int8 parts)."""

from __future__ import annotations

import pytest
import torch

from souverain import kernels
from souverain.kernels import tiles
from souverain.model.quant import _int4_codes

fast = kernels.load()
ISAS = [isa for isa in (1024, 512, 256) if fast is not None and fast.q4_supported(isa)]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C++ compiler, or a CPU without AVX2: the PyTorch ops serve")

# (N, K): SmolLM2 (dim 576, 9 heads of 64, 3 KV heads, hidden 1536): wqkv, w13, w2; Mistral 7B (dim 4096,
# 32 heads, 8 KV heads, hidden 14336): wqkv and w2; a GQA 4:1 model (dim 1024, 16 heads, 4 KV heads): wqkv.
SHAPES = [(960, 576), (3072, 576), (576, 1536), (6144, 4096), (4096, 14336), (1536, 1024)]
ROWS = [1, 3, 5, 17, 67]


def int4_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tiles.pack_q4(*_int4_codes(torch.randn(n, k, generator=g) * 0.05))


def close_to_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """got (bf16) is want (fp32, the same arithmetic in another order) rounded: within a bf16 step or two."""
    scale = want.abs().amax(-1, keepdim=True).clamp(min=1e-6)
    assert ((got.float() - want).abs() <= want.abs() / 128 + scale * 1e-4).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@torch.inference_mode()
def test_q4_linear_matches_the_reference(isa: int, n: int, k: int) -> None:
    codes, sz = int4_weight(n, k, seed=n + k)
    g = torch.Generator().manual_seed(k)
    for m in ROWS if n * k < 10_000_000 else [1, 3]:
        x = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
        got = fast.q4_linear(x, codes, sz, isa)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        close_to_bf16(got, tiles.q4_reference(x, codes, sz))


@pytest.mark.parametrize("isa", ISAS)
@torch.inference_mode()
def test_the_second_part_reads_beside_an_outlier(isa: int) -> None:
    """One outlier channel sets its block's scale: the residual part (q2) keeps the other values' bits, the
    product ~16x closer to bf16 activations' than q1 alone (int8 per 32 values) would be (computed here)."""
    codes, sz = int4_weight(576, 1536, seed=5)
    w = tiles.dequantise_int4(*tiles.unpack_q4(codes, sz))
    x = torch.randn(9, 1536)
    x[:, 7] = 300.0
    x = x.to(torch.bfloat16)
    want = x.float() @ w.t()
    blocks = x.float().reshape(9, 48, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    one = ((torch.round(blocks * (127 / amax)) * (amax / 127)).reshape(9, 1536) @ w.t() - want).norm() / want.norm()
    two = (fast.q4_linear(x, codes, sz, isa, True) - want).norm() / want.norm()  # fp32 out: no bf16 rounding
    assert two < 0.003 and one > 8 * two, (one, two)


@pytest.mark.parametrize("isa", ISAS)
@torch.inference_mode()
def test_fp32_output_is_the_bf16_output_before_rounding(isa: int) -> None:
    codes, sz = int4_weight(960, 576, seed=6)
    q8, s8 = tiles.pack_q8(torch.randint(-127, 128, (960, 576), dtype=torch.int8), torch.rand(960) / 100)
    for m in (1, 3, 20):
        x = torch.randn(m, 576).to(torch.bfloat16)
        full = fast.q4_linear(x, codes, sz, isa, True)
        rounded = fast.q4_linear(x, codes, sz, isa)
        assert full.dtype == torch.float32 and torch.equal(full.to(torch.bfloat16), rounded)
        full = fast.q8_linear(x, q8, s8, isa, True)
        assert full.dtype == torch.float32 and torch.equal(full.to(torch.bfloat16), fast.q8_linear(x, q8, s8, isa))


@pytest.mark.parametrize("isa", ISAS)
@torch.inference_mode()
def test_q4_is_close_to_the_unquantised_product(isa: int) -> None:
    """int8 activations cost little: the product stays within ~1% of bf16 activations on the same weights."""
    codes, sz = int4_weight(3072, 576, seed=1)
    w = tiles.dequantise_int4(*tiles.unpack_q4(codes, sz))
    x = torch.randn(9, 576).to(torch.bfloat16)
    want = x.float() @ w.t()
    got = fast.q4_linear(x, codes, sz, isa).float()
    assert (got - want).norm() / want.norm() < 0.01


@pytest.mark.parametrize("isa", ISAS)
@torch.inference_mode()
def test_a_row_gets_the_same_bits_alone_or_with_any_neighbours(isa: int) -> None:
    codes, sz = int4_weight(960, 576, seed=2)
    x = torch.randn(67, 576).to(torch.bfloat16)
    together = fast.q4_linear(x, codes, sz, isa)
    q8, s8 = tiles.pack_q8(torch.randint(-127, 128, (960, 576), dtype=torch.int8), torch.rand(960) / 100)
    together8 = fast.q8_linear(x, q8, s8, isa)
    for rows in ([0], [5, 6, 7], list(range(60, 67)), [66], list(range(0, 40))):
        assert torch.equal(fast.q4_linear(x[rows], codes, sz, isa), together[rows])
        assert torch.equal(fast.q8_linear(x[rows], q8, s8, isa), together8[rows])


@pytest.mark.parametrize("isa", ISAS)
@torch.inference_mode()
def test_strided_rows_read_in_place(isa: int) -> None:
    """x as a column slice of a wider tensor (rows lie apart): read where it is, the same result."""
    codes, sz = int4_weight(576, 576, seed=3)
    wide = torch.randn(13, 3 * 576).to(torch.bfloat16)
    x = wide[:, 576:1152]
    assert x.stride(0) != 576
    assert torch.equal(fast.q4_linear(x, codes, sz, isa), fast.q4_linear(x.contiguous(), codes, sz, isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "k"), [(49152, 576), (512, 1024)])
@torch.inference_mode()
def test_q8_linear_matches_the_reference(isa: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.05
    scales = w.abs().amax(1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    codes, s = tiles.pack_q8(q, scales)
    assert torch.equal(tiles.unpack_q8(codes), q)
    for m in (1, 4, 33):
        x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
        want = tiles.quantise_rows(x, per_row=True) @ (q.float() * scales[:, None]).t()
        got = fast.q8_linear(x, codes, s, isa)
        close_to_bf16(got, want)
        assert torch.equal(fast.q8_linear(x[-1:], codes, s, isa), got[-1:])


@torch.inference_mode()
def test_every_instruction_set_gives_the_same_bits() -> None:
    """The integer sums are exact and the fp32 steps the same: AMX, AVX-512 and AVX2 agree to the bit."""
    if len(ISAS) < 2:
        pytest.skip("this CPU runs one of the instruction sets")
    codes, sz = int4_weight(960, 576, seed=4)
    q8, s8 = tiles.pack_q8(torch.randint(-127, 128, (960, 576), dtype=torch.int8), torch.rand(960) / 100)
    for m in (3, 7, 40):
        x = torch.randn(m, 576).to(torch.bfloat16)
        x[:, 5] = 40.0  # an outlier: the second parts carry most values
        first = fast.q4_linear(x, codes, sz, ISAS[0])
        assert all(torch.equal(first, fast.q4_linear(x, codes, sz, isa)) for isa in ISAS[1:])
        first = fast.q8_linear(x, q8, s8, ISAS[0])
        assert all(torch.equal(first, fast.q8_linear(x, q8, s8, isa)) for isa in ISAS[1:])


def test_packing_round_trips() -> None:
    q, sz = _int4_codes(torch.randn(48, 96))
    codes, packed = tiles.pack_q4(q, sz)
    back, back_sz = tiles.unpack_q4(codes, packed)
    assert torch.equal(back, q) and torch.equal(back_sz, sz)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiles.pack_q4(q[:40], sz[:, :40])


def test_bad_input_is_refused() -> None:
    codes, sz = int4_weight(64, 64, seed=5)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="isa must be"):
        fast.q4_linear(x, codes, sz, 128)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fast.q4_linear(x.float(), codes, sz, ISAS[0])
    with pytest.raises(RuntimeError, match="columns"):
        fast.q4_linear(torch.randn(2, 96).to(torch.bfloat16), codes, sz, ISAS[0])
    with pytest.raises(RuntimeError, match="scales"):
        fast.q4_linear(x, codes, sz[:1], ISAS[0])
    with pytest.raises(RuntimeError, match="codes must be"):
        fast.q8_linear(x, codes, torch.ones(64), ISAS[0])
    assert fast.q4_linear(x[:0], codes, sz, ISAS[0]).shape == (0, 64)
