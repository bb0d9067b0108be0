"""Weights in the layouts of our C++ products (`amx_linear` in gemm.cpp, `q4_linear` in q4.cpp, which
`q4_linear_bf16` reads too), and back (plain PyTorch, no build)."""

from __future__ import annotations

import torch


def _tile_order(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/32, K/32, 2, 16, 32]: 32-column blocks of two 16-column tiles, each 16 rows of
    K-pairs; lane 2c + j of row r is w[c, 2r + j] (AMX's VNNI order, gemm.cpp)."""
    n, k = w.shape
    if n % 32 or k % 32:
        raise ValueError(f"AMX tiles need both sides of the weight in multiples of 32, got {n} x {k}")
    return w.reshape(n // 32, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(n // 32, k // 32, 2, 16, 32)


def _row_order(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `_tile_order`."""
    nb, kb = t.shape[:2]
    return t.reshape(nb, kb, 2, 16, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(nb * 32, kb * 32)


def pack_tiles(w: torch.Tensor) -> torch.Tensor:
    """A linear's weight w [N, K] in `amx_linear`'s layout, [N/32, K/32, 2, 16, 32] bfloat16."""
    return _tile_order(w.detach().to(torch.bfloat16)).contiguous()


def unpack_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_tiles`: the weight [N, K] (a copy)."""
    return _row_order(tiles)


def pack_q4(q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes q [N, K] (0..15; w = (q - 8) * scale + zero) and their scales and zeros [K/32, N, 2]
    in `q4_linear`'s layout (souverain/kernels/q4.cpp): codes [N/16, K/32, 4, 64] uint8, byte 4j + i of
    part t holding row j's codes 4t + i (low nibble) and 16 + 4t + i (high nibble) of the block, and
    [N/16, K/32, 2 (scale, zero), 16] bfloat16."""
    n, k = q.shape
    if n % 16 or k % 32:
        raise ValueError(f"q4_linear needs N a multiple of 16 and K of 32, got {n} x {k}")
    c = q.to(torch.uint8).reshape(n // 16, 16, k // 32, 2, 4, 4)  # [T, j, b, half, t, i]
    nibbles = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [T, b, t, j, i]
    sz = scales_zeros.to(torch.bfloat16).reshape(k // 32, n // 16, 16, 2).permute(1, 0, 3, 2)
    return nibbles.reshape(n // 16, k // 32, 4, 64).contiguous(), sz.contiguous()


def unpack_q4(codes: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_q4`: (codes [N, K] int32, scales and zeros [K/32, N, 2] bfloat16)."""
    t, nb = codes.shape[:2]
    c = codes.reshape(t, nb, 4, 16, 4).permute(0, 3, 1, 2, 4)  # [T, j, b, t, i]
    q = torch.stack([c & 15, c >> 4], dim=3).reshape(t * 16, nb * 32)  # [T, j, b, half, t, i]
    return q.to(torch.int32), sz.permute(1, 0, 3, 2).reshape(nb, t * 16, 2)


def quantise_rows(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """x [M, K] as `q4_linear` (per 32 values) and `q8_linear` (`per_row`) read it, fp32 (the dequantised
    values): per block (or row) the unit u = amax / 127 / 16, q1 = round(x * 127 / amax) and
    q2 = round((x - q1 * amax / 127) * 16 * 127 / amax); x = u * (16 q1 + q2) (11 bits; q4.cpp's operations)."""
    m, k = x.shape
    xf = x.float().reshape(m, 1 if per_row else k // 32, -1)
    amax = xf.abs().amax(-1, keepdim=True)
    # 127 / amax as the kernel divides: `127 / tensor` would multiply by a reciprocal (another rounding).
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q1 = torch.round(xf * inv)
    q2 = torch.round((xf - amax / 127 * q1) * (inv * 16))
    return ((q1 * 16 + q2) * (amax / 127 / 16)).reshape(m, k)


def q4_reference(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """What `q4_linear` computes, in PyTorch (fp32): x's 11-bit blocks times the dequantised weight."""
    return quantise_rows(x) @ dequantise_int4(*unpack_q4(codes, sz)).t()


def dequantise_int4(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """int4 codes q [N, K] and scales and zeros [K/32, N, 2] -> the weight [N, K] in fp32."""
    s, z = (scales_zeros[..., i].float().t().repeat_interleave(32, dim=1) for i in (0, 1))  # [N, K]
    return (q.float() - 8) * s + z


def pack_q8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights q [N, K] (-127..127; w = q * scale, one scale per output row) in `q8_linear`'s layout:
    codes q + 128 [N/16, K/32, 8, 64] uint8, byte 4j + i of part t holding row j's code 4t + i of the
    block, and the scales [N] float32."""
    n, k = q.shape
    if n % 16 or k % 32:
        raise ValueError(f"q8_linear needs N a multiple of 16 and K of 32, got {n} x {k}")
    c = (q.to(torch.int16) + 128).to(torch.uint8).reshape(n // 16, 16, k // 32, 8, 4)  # [T, j, b, t, i]
    return c.permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 8, 64).contiguous(), scales.float().contiguous()


def unpack_q8(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_q8`'s codes: q [N, K] int8."""
    t, nb = codes.shape[:2]
    c = codes.reshape(t, nb, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(t * 16, nb * 32)
    return (c.to(torch.int16) - 128).to(torch.int8)
