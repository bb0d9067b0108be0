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


def attend_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attend` in float64, rounded to q's dtype at the end: the PyTorch backend's engine attention. The
    products of bf16 (or fp32) values are exact in float64 and their sums over a head's dimensions are
    too at the magnitudes of real activations, so a query's scores do not depend on the shapes PyTorch's
    kernels were called with; the softmax and the weighted sum round at 1e-16, far below the output's
    rounding: a query gets the same result however its sequence is chunked or batched. mask None means
    plain causal (queries and keys the same rows)."""
    t, s = q.shape[1], k.shape[1]
    rep = q.shape[2] // k.shape[2]
    qd = q.transpose(1, 2).double()  # [B, H, T, hd]
    kd = k.transpose(1, 2).double().repeat_interleave(rep, dim=1)  # [B, H, S, hd]
    vd = v.transpose(1, 2).double().repeat_interleave(rep, dim=1)
    scores = (qd @ kd.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vd  # [B, H, T, hd]
    return out.transpose(1, 2).to(q.dtype)
