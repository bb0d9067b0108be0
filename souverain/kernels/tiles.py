"""Weights in the layouts of the AMX products in gemm.cpp, and back (plain PyTorch, no build)."""

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


def pack_int4_tiles(q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes q [N, K] (0..15; w = (q - 8) * scale + zero) and their scales and zeros [K/32, N, 2]
    (per 32 values of a row, the layout `_int4` in souverain/model/quant.py makes) in
    `amx_linear_int4`'s layout: nibbles [N/32, K/32, 2, 16, 16] uint8 (tile row lanes i and 16 + i in
    byte i) and [N/32, K/32, 2 (scale, zero), 32] bfloat16."""
    n, k = q.shape
    lanes = _tile_order(q.to(torch.uint8))
    nibbles = (lanes[..., :16] | (lanes[..., 16:] << 4)).contiguous()
    sz = scales_zeros.to(torch.bfloat16).reshape(k // 32, n // 32, 32, 2).permute(1, 0, 3, 2).contiguous()
    return nibbles, sz


def unpack_int4_tiles(nibbles: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in bfloat16 that `pack_int4_tiles`' output stands for, dequantised."""
    nb, kb = nibbles.shape[:2]
    q = _row_order(torch.cat([nibbles & 15, nibbles >> 4], dim=-1)).reshape(nb * 32, kb, 32)
    scale, zero = (sz[:, :, i].float().permute(0, 2, 1).reshape(nb * 32, kb, 1) for i in (0, 1))
    return ((q.float() - 8) * scale + zero).reshape(nb * 32, kb * 32).to(torch.bfloat16)


def unpack_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_tiles`: the weight [N, K] (a copy)."""
    return _row_order(tiles)
