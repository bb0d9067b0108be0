"""Attention arithmetic shared by the plain path and every KV view."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] bool, True where a query may attend a key: causal, inside the sliding window,
    and not a padding key (position -1). q_pos [B, T], k_pos [B, S]."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]  # [B, T, 1], [B, 1, S]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= q - k < window
    return allowed[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, T, H, hd], k/v [B, S, Hkv, hd] -> [B, T, H, hd]. mask None means plain causal."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if t == 1 and mask is not None and h != hkv:
        # Decoding with GQA: the h // hkv query heads sharing a kv head become that head's queries
        # (all at the same position, so the mask is the same). Fewer, larger units for the CPU kernel.
        qg = q.reshape(b, hkv, h // hkv, d)  # [B, Hkv, rep, hd]; query head i reads kv head i // rep
        out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.reshape(b, 1, h, d)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, T|S, hd]
        attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
