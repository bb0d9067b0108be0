"""The bf16 matrix products (gemm.cpp: AMX tiles, or AVX-512 BF16's vector units for int4 weights) against
PyTorch's, and QuantLinear on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from souverain import kernels
from souverain.kernels import tiles
from souverain.kernels.backend import Backend
from souverain.model.layers import PromptRows
from souverain.model.quant import QuantLinear, _int4_codes

fast = kernels.load()
AMX = Backend("amx", fast)
HAS_AMX = fast is not None and fast.amx_available()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="no AMX here (or no compiler)")
# q4_linear_bf16's products this machine runs: 1024 AMX tiles, 512 AVX-512 BF16 (every AMX CPU has both).
ISAS = [isa for isa in (1024, 512) if fast is not None and fast.bf16_supported(isa)]
BACKENDS = {1024: "amx", 512: "avx512"}
each_isa = pytest.mark.parametrize("isa", ISAS or [pytest.param(0, marks=pytest.mark.skip(
    reason="no AMX or AVX-512 BF16 here (or no compiler): prompt rows take q4_linear"))])
# Partial tiles, one and two tiles of rows, several row blocks; the vector kernel's blocks of 12 rows and the
# rows past them.
ROWS = [1, 5, 12, 13, 16, 17, 25, 32, 33, 100]


def within_rounding(got: torch.Tensor, want: torch.Tensor, terms: torch.Tensor | None = None) -> None:
    """bf16 results that differ from `want` (fp32) by no more than their own rounding, plus a
    little for the order of the fp32 sums: 1e-3, or where given, 2^-20 of `terms` (the sums of the
    products' magnitudes: a long sum that cancels to near zero keeps fp32's error of its terms)."""
    err = (got.float() - want).abs()
    slack = 1e-3 if terms is None else torch.clamp(terms * 2.0**-20, min=1e-3)
    assert (err <= want.abs() / 128 + slack).all(), err.max().item()


@needs_amx
@pytest.mark.parametrize("n,k", [(96, 64), (64, 160), (1024, 32)])  # 1024 x 32: threads split the columns
@torch.inference_mode()
def test_amx_linear_is_matmul(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    w = torch.randn(n, k).to(torch.bfloat16)
    packed = tiles.pack_tiles(w)
    assert torch.equal(tiles.unpack_tiles(packed), w)
    for m in ROWS:
        x = torch.randn(m, k).to(torch.bfloat16)
        got = fast.amx_linear(x, packed)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        within_rounding(got, x.float() @ w.float().t())
        assert (got == x @ w.t()).float().mean().item() > 0.98  # oneDNN sums in another order
        # Each row is computed alone: the same row gives the same bits in any batch.
        assert torch.equal(fast.amx_linear(x[-1:], packed), got[-1:])


@each_isa
# 1536: SmolLM2's w2; 4096 and 14336: Mistral-7B's model and feed-forward widths (64 of their output columns)
@pytest.mark.parametrize("n,k", [(96, 64), (64, 160), (1024, 32), (64, 1536), (64, 4096), (64, 14336)])
@torch.inference_mode()
def test_q4_linear_bf16_is_the_dequantised_product(n: int, k: int, isa: int) -> None:
    """q4_linear's int4 codes in bf16 products: x times (q - 8) * scale (rounded to bf16) plus each block's sum
    times its zero, summed in fp32 -- the int4 weight's product to bf16 rounding, even where the zeros
    dominate; a row alone gives the bits it gets in any batch."""
    torch.manual_seed(n * k)
    weight = torch.randn(n, k)
    weight[: n // 2] = weight[: n // 2].abs() + 4  # blocks of one sign: zeros far larger than the steps
    codes, sz = _int4_codes(weight)
    packed, scales = tiles.pack_q4(codes, sz)
    # Per 32 values of a row: (q - 8) * scale rounded to bf16, plus the zero unrounded (fp32).
    scale, zero = (sz[..., i].float().t().repeat_interleave(32, dim=1) for i in (0, 1))
    w = ((codes.float() - 8) * scale).to(torch.bfloat16).float() + zero
    for m in ROWS:
        x = torch.randn(m, k).to(torch.bfloat16)
        got = fast.q4_linear_bf16(x, packed, scales, False, isa)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        within_rounding(got, x.float() @ w.float().t(), x.float().abs() @ w.float().abs().t())
        for r in (0, m - 1):
            assert torch.equal(fast.q4_linear_bf16(x[r : r + 1], packed, scales, False, isa), got[r : r + 1])
        # Strided rows (a view of a wider tensor) read the same.
        wide = torch.randn(m, k + 32).to(torch.bfloat16)
        wide[:, :k] = x
        assert torch.equal(fast.q4_linear_bf16(wide[:, :k], packed, scales, False, isa), got)


@pytest.mark.skipif(ISAS != [1024, 512], reason="needs AMX: the tiles against the vector products")
@torch.inference_mode()
def test_the_vector_products_agree_with_the_tiles() -> None:
    """AVX-512 BF16's products and AMX's multiply the same bf16 operands: they differ only in the order of
    the fp32 sums, so by at most the output's bf16 rounding, and mostly not at all."""
    torch.manual_seed(11)
    packed, scales = tiles.pack_q4(*_int4_codes(torch.randn(192, 576)))
    x = torch.randn(77, 576).to(torch.bfloat16)
    tiles_out, vector_out = (fast.q4_linear_bf16(x, packed, scales, False, isa).float() for isa in (1024, 512))
    assert ((tiles_out - vector_out).abs() <= tiles_out.abs() / 128 + 1e-3).all()
    assert (tiles_out == vector_out).float().mean().item() > 0.9


@pytest.mark.parametrize("form", [*(f"int4-{isa}" for isa in ISAS), pytest.param("bf16", marks=needs_amx)])
@torch.inference_mode()
def test_glu_is_swiglu_of_the_product(form: str) -> None:
    """glu=True: silu(gate) * up of a fused [gate | up] weight, to the bit what swiglu makes of the
    product's output (each half 96 columns: three blocks, so a thread may take an odd number)."""
    torch.manual_seed(3)
    w = torch.randn(192, 64)
    isa = int(form.split("-")[1]) if form.startswith("int4") else 1024
    if form.startswith("int4"):
        packed, scales = tiles.pack_q4(*_int4_codes(w))
        def product(x: torch.Tensor, glu: bool = False) -> torch.Tensor:
            return fast.q4_linear_bf16(x, packed, scales, glu, isa)
    else:
        dense = tiles.pack_tiles(w)
        def product(x: torch.Tensor, glu: bool = False) -> torch.Tensor:
            return fast.amx_linear(x, dense, glu)
    for m in [*ROWS, 200]:  # up to 32 rows the one-pass kernel, beyond it the panel one
        x = (3 * torch.randn(m, 64)).to(torch.bfloat16)
        got = product(x, True)
        assert got.shape == (m, 96)
        assert torch.equal(got, fast.swiglu(product(x)))
    with pytest.raises(RuntimeError, match="whole 32-column blocks"):
        if form.startswith("int4"):
            fast.q4_linear_bf16(x, *tiles.pack_q4(*_int4_codes(w[:96])), True, isa)
        else:
            fast.amx_linear(x, tiles.pack_tiles(w[:96]), True)


@needs_amx
def test_amx_refuses_bad_input() -> None:
    w = torch.randn(64, 64).to(torch.bfloat16)
    packed = tiles.pack_tiles(w)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fast.amx_linear(x.float(), packed)
    with pytest.raises(RuntimeError, match="columns"):
        fast.amx_linear(torch.randn(3, 96).to(torch.bfloat16), packed)
    with pytest.raises(RuntimeError, match="packed"):
        fast.amx_linear(x, w)
    with pytest.raises(ValueError, match="multiples of 32"):
        tiles.pack_tiles(torch.randn(48, 64))


@pytest.mark.skipif(fast is None, reason="no compiler: no kernels")
def test_q4_linear_bf16_refuses_bad_input() -> None:
    codes, scales = tiles.pack_q4(*_int4_codes(torch.randn(64, 64)))
    x = torch.randn(3, 64).to(torch.bfloat16)
    for isa in (0, 256, *(i for i in (1024, 512) if i not in ISAS)):  # what this machine cannot run
        with pytest.raises(RuntimeError, match=f"isa {isa} does not run here"):
            fast.q4_linear_bf16(x, codes, scales, False, isa)
    for isa in ISAS:
        with pytest.raises(RuntimeError, match="bfloat16"):
            fast.q4_linear_bf16(x.float(), codes, scales, False, isa)
        with pytest.raises(RuntimeError, match="scales and zeros"):
            fast.q4_linear_bf16(x, codes, scales[:, :1], False, isa)
        with pytest.raises(RuntimeError, match="multiple of 32"):  # 48 columns: q4_linear's, not 32-column blocks
            fast.q4_linear_bf16(x, *tiles.pack_q4(*_int4_codes(torch.randn(48, 64))), False, isa)
        with pytest.raises(RuntimeError, match="columns"):
            fast.q4_linear_bf16(torch.randn(3, 96).to(torch.bfloat16), codes, scales, False, isa)


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_on_tiles(bits: int) -> None:
    """Packed for AMX, a layer keeps what it computes: int8 layers the same weights, int4 ones the int4
    kernel's weights (same codes); narrow steps go through q4/q8_linear (int8 activations, close);
    with autograd the tiles are unpacked and gradients flow."""
    torch.manual_seed(bits)
    lin = nn.Linear(96, 64, bias=True).to(torch.bfloat16)
    q = QuantLinear(lin, bits, dense_rows=4)
    x = torch.randn(2, 20, 96).to(torch.bfloat16)
    with torch.no_grad():
        before = q(x).float()
        small = q(x[:, :2]).float()  # the int kernel, 4 rows
        q.prepare(AMX)
        assert q.dense_t is None and q.codes is not None
        after = q(x).float()
        narrow = q(x[:, :2]).float()  # q4_linear / q8_linear
        assert (narrow - small).abs().max().item() <= 2e-2 * small.abs().max().item()
    if bits == 8:
        assert (after - before).abs().max().item() <= 1e-2 * before.abs().max().item()
    else:  # the int4 grid instead of the exact weights, as the int4 kernel's rows
        assert (after[:, :2] - small).abs().max().item() <= 1e-2 * small.abs().max().item()
    xg = x.clone().requires_grad_()
    q(xg).float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum().item() > 0


@each_isa
@torch.inference_mode()
def test_prompt_rows_take_the_bf16_product(isa: int) -> None:
    """Packed for AMX or AVX-512 (with BF16), an int4 layer computes the rows `PromptRows` names with
    q4_linear_bf16 and the others with q4_linear, whatever else is in the batch; glu gives swiglu of the
    same output, to the bit."""
    torch.manual_seed(5)
    backend = Backend(BACKENDS[isa], fast)
    lin = nn.Linear(96, 128, bias=False).to(torch.bfloat16)
    q = QuantLinear(lin, 4)
    q.prepare(backend)
    assert q.prompt_bf16 and q.codes is not None and q.code_scales is not None
    x = torch.randn(7, 96).to(torch.bfloat16)
    bf16 = fast.q4_linear_bf16(x, q.codes, q.code_scales, False, isa)
    int8 = fast.q4_linear(x, q.codes, q.code_scales, backend.q4_isa)
    assert not torch.equal(bf16, int8)
    assert torch.equal(q(x), int8)  # no PromptRows: every row a generated token
    assert torch.equal(q(x, prompt=PromptRows()), bf16)
    kinds = [True, False, False, True, True, False, True]
    mixed = q(x, prompt=PromptRows.of(kinds))
    for r, k in enumerate(kinds):
        assert torch.equal(mixed[r], (bf16 if k else int8)[r])
    assert PromptRows.of([False, False]) is None
    run = PromptRows.of([True] * 4 + [False] * 3)  # the engine's order: prompt rows first, as views
    assert run is not None and run.count == 4 and run.rows is None
    assert torch.equal(q(x, prompt=run), torch.cat([bf16[:4], int8[4:]]))
    for prompt in (PromptRows(), PromptRows.of(kinds)):
        assert torch.equal(q(x, prompt=prompt, glu=True), fast.swiglu(q(x, prompt=prompt)))
    # A layer with a bias adds it before swiglu.
    biased = QuantLinear(nn.Linear(96, 128, bias=True).to(torch.bfloat16), 4)
    biased.prepare(backend)
    assert torch.equal(biased(x, prompt=PromptRows(), glu=True), fast.swiglu(biased(x, prompt=PromptRows())))
