"""The blocks of a decoder layer: RMSNorm, attention (GQA, sliding window), SwiGLU feed-forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from souverain.model.args import ModelArgs
from souverain.model.attention import attend
from souverain.model.kv import KVView
from souverain.model.lora import LoraBatch
from souverain.model.moe import MoeFeedForward
from souverain.model.rope import apply_rope


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: rotary tables, mask or KV view, positions."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None = None  # plain path only; None means causal
    kv: KVView | None = None
    lora: LoraBatch | None = None

    def project(self, layer: int, target: str, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """proj(x), plus the LoRA update of the rows that have an adapter."""
        y: torch.Tensor = proj(x)
        return y if self.lora is None else self.lora.apply(layer, target, x, y)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.hd
        bias = args.attention_bias
        self.wq = nn.Linear(args.dim, args.n_heads * args.hd, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.hd, args.dim, bias=bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        b, t, _ = x.shape
        q = ctx.project(self.layer, "wq", self.wq, x).view(b, t, self.n_heads, self.head_dim)
        k = ctx.project(self.layer, "wk", self.wk, x).view(b, t, self.n_kv_heads, self.head_dim)
        v = ctx.project(self.layer, "wv", self.wv, x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.kv is None:
            out = attend(q, k, v, ctx.mask)
        else:
            out = ctx.kv.attend(self.layer, q, k, v, ctx.positions)
        return ctx.project(self.layer, "wo", self.wo, out.reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        if ctx is None or ctx.lora is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        h = F.silu(ctx.project(self.layer, "w1", self.w1, x)) * ctx.project(self.layer, "w3", self.w3, x)
        return ctx.project(self.layer, "w2", self.w2, h)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = args.moe is not None
        self.feed_forward: nn.Module = MoeFeedForward(args) if args.moe else FeedForward(args, layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), ctx)
        if self.moe:  # LoRA adapts attention only in MoE models
            return h + self.feed_forward(self.ffn_norm(h))
        return h + self.feed_forward(self.ffn_norm(h), ctx)
