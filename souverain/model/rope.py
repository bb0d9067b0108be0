"""Rotary position embedding (the rotate-half layout of HF checkpoints; loaders convert others)."""

from __future__ import annotations

import math
from types import ModuleType

import torch

from souverain import kernels
from souverain.model.args import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with the checkpoint's scaling applied."""
    hd = args.hd
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = args.rope_scaling
    if s is not None and s.kind == "linear":
        inv_freq = inv_freq / s.factor
    elif s is not None and s.kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, s.factor, s.low_freq_factor, s.high_freq_factor,
                                 s.original_max_position_embeddings)
    elif s is not None:
        raise ValueError(f"unsupported rope scaling {s.kind!r}")
    if args.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32, device="cpu")
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, factor: float, low: float, high: float, old_len: int) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly.
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for integer positions [B, T]; computed in fp32, returned in dtype."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
    """x [B, T, H, hd]; cos/sin [B, T, hd]; `ops`: the backend's C++ kernels, if any."""
    fast = kernels.usable(ops, x, cos, sin, multiple=x.shape[-1] // 2)
    if fast is not None and cos.shape[:2] == x.shape[:2]:
        b, t, h, d = x.shape
        rows = kernels.rows_contiguous(x.reshape(b * t, h, d))
        out = fast.rope(rows, cos.reshape(b * t, d).contiguous(), sin.reshape(b * t, d).contiguous())
        return out.view(b, t, h, d)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
