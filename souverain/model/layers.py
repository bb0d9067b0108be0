"""The blocks of a decoder layer: RMSNorm, attention (GQA, sliding window), SwiGLU feed-forward."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from souverain import kernels
from souverain.model.args import ModelArgs
from souverain.model.attention import attend
from souverain.model.kv import KVView
from souverain.model.lora import LoraBatch
from souverain.model.moe import MoeFeedForward
from souverain.model.rope import apply_rope


@dataclass(frozen=True)
class PromptRows:
    """Which rows of a forward's flattened tokens are prompt tokens (the others: tokens the model generated,
    or recomputes after a preemption). On AMX, int4 projections compute prompt rows as bf16 products and
    generated rows as q4_linear's int4 x int8 ones (souverain/model/quant.py): each token always one way,
    whatever the batch. `count`: the first `count` rows are the prompt rows (the engine orders them so: views,
    no gathers); else `rows`/`others`, the two kinds' row indices; all None: every row is a prompt row."""

    count: int | None = None
    rows: torch.Tensor | None = None
    others: torch.Tensor | None = None

    @classmethod
    def of(cls, kinds: list[bool], device: torch.device | str = "cpu") -> PromptRows | None:
        """From each row's kind (True: a prompt token); None where no row is a prompt row."""
        if all(kinds):
            return cls()
        if not any(kinds):
            return None
        count = kinds.index(False)
        if not any(kinds[count:]):
            return cls(count=count)
        rows = [i for i, k in enumerate(kinds) if k]
        others = [i for i, k in enumerate(kinds) if not k]
        return cls(rows=torch.tensor(rows, device=device), others=torch.tensor(others, device=device))


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: rotary tables, mask or KV view, positions, which rows
    are prompt tokens, and the backend's C++ kernels (`ops`; None: PyTorch ops)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None = None  # plain path only; None means causal
    kv: KVView | None = None
    lora: LoraBatch | None = None
    ops: ModuleType | None = None
    prompt: PromptRows | None = None

    def linear(self, proj: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """proj(x); projections that compute prompt rows their own way (QuantLinear) are told which."""
        assert proj is not None
        if self.prompt is not None and getattr(proj, "splits_prompt_rows", False):
            return proj(x, prompt=self.prompt)  # type: ignore[no-any-return]
        return proj(x)  # type: ignore[no-any-return]

    def gated(self, proj: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """swiglu(proj(x)) for a fused [gate | up] projection (in one product where proj can)."""
        assert proj is not None
        if self.prompt is not None and getattr(proj, "splits_prompt_rows", False):
            return proj(x, prompt=self.prompt, glu=True)  # type: ignore[no-any-return]
        return swiglu(proj(x), self.ops)

    def project(self, layer: int, target: str, proj: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """proj(x), plus the LoRA update of the rows that have an adapter."""
        y = self.linear(proj, x)
        return y if self.lora is None else self.lora.apply(layer, target, x, y)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
        fast = kernels.usable(ops, x, self.weight, multiple=x.shape[-1])
        if fast is not None:
            return fast.rms_norm(x.contiguous(), self.weight, self.eps)
        # Normalise in fp32 whatever the compute dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_forward(self, x: torch.Tensor, r: torch.Tensor, ops: ModuleType | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, this norm of it): a residual add and the norm after it, in one pass where the kernels run
        (the same bits as the two ops)."""
        fast = kernels.usable(ops, x, r, self.weight, multiple=x.shape[-1])
        if fast is not None and x.shape == r.shape:
            return fast.add_rms_norm(x.contiguous(), r.contiguous(), self.weight, self.eps)
        h = x + r
        return h, self.forward(h, ops)


def add(x: torch.Tensor, r: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
    """x + r: on the kernels' thread pool where they run (ATen's add would take OpenMP's threads, whose second
    one waits for the core the pool's worker holds)."""
    fast = kernels.usable(ops, x, r, multiple=x.shape[-1])
    if fast is not None and x.shape == r.shape:
        return fast.add_rows(x.contiguous(), r.contiguous())
    return x + r


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.hd
        bias = args.attention_bias
        self.wq: nn.Module | None = nn.Linear(args.dim, args.n_heads * args.hd, bias=bias)
        self.wk: nn.Module | None = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=bias)
        self.wv: nn.Module | None = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.hd, args.dim, bias=bias)
        self.wqkv: nn.Module | None = None  # set by fuse_qkv (inference): one matmul for q, k and v

    def fuse_qkv(self, wqkv: nn.Module) -> None:
        """Replace wq, wk, wv by one projection computing [q | k | v]."""
        self.wqkv, self.wq, self.wk, self.wv = wqkv, None, None, None

    def _qkv(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is None:
            return (ctx.project(self.layer, "wq", self.wq, x), ctx.project(self.layer, "wk", self.wk, x),
                    ctx.project(self.layer, "wv", self.wv, x))
        kv = self.n_kv_heads * self.head_dim
        q, k, v = ctx.linear(self.wqkv, x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        if ctx.lora is not None:
            q, k, v = (ctx.lora.apply(self.layer, t, x, y) for t, y in (("wq", q), ("wk", k), ("wv", v)))
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, ctx)
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin, ctx.ops), apply_rope(k, ctx.cos, ctx.sin, ctx.ops)
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
        self.w1: nn.Module | None = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.w3: nn.Module | None = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.w13: nn.Module | None = None  # set by fuse_w13 (inference): one matmul for w1 and w3

    def fuse_w13(self, w13: nn.Module) -> None:
        """Replace w1 and w3 by one projection computing [w1 x | w3 x]."""
        self.w13, self.w1, self.w3 = w13, None, None

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        lora, ops = (None, None) if ctx is None else (ctx.lora, ctx.ops)

        def linear(proj: nn.Module | None, v: torch.Tensor) -> torch.Tensor:
            assert proj is not None
            return proj(v) if ctx is None else ctx.linear(proj, v)  # type: ignore[no-any-return]

        if self.w13 is None:
            gate, up = linear(self.w1, x), linear(self.w3, x)
            if lora is not None:
                gate, up = lora.apply(self.layer, "w1", x, gate), lora.apply(self.layer, "w3", x, up)
            h = silu_mul(gate, up, ops)
        elif lora is None:
            h = swiglu(self.w13(x), ops) if ctx is None else ctx.gated(self.w13, x)
        else:
            gate, up = linear(self.w13, x).chunk(2, dim=-1)
            h = silu_mul(lora.apply(self.layer, "w1", x, gate), lora.apply(self.layer, "w3", x, up), ops)
        y = linear(self.w2, h)
        return y if lora is None else lora.apply(self.layer, "w2", h, y)


def silu_mul(a: torch.Tensor, b: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
    """silu(a) * b, in one pass where the C++ kernels `ops` apply."""
    fast = kernels.usable(ops, a, b)
    if fast is not None and a.shape == b.shape:
        return fast.silu_mul(a.contiguous(), b.contiguous())
    return F.silu(a) * b


def swiglu(gu: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
    """silu(gate) * up from a fused [gate | up] projection output, without splitting it where the
    kernels `ops` apply."""
    fast = kernels.usable(ops, gu)
    if fast is not None:
        return fast.swiglu(gu.contiguous())
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = args.moe is not None
        self.feed_forward: nn.Module = MoeFeedForward(args) if args.moe else FeedForward(args, layer)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, f = self.ffn_norm.add_forward(x, self.attention(self.attention_norm(x, ctx.ops), ctx), ctx.ops)
        if self.moe:  # LoRA adapts attention only in MoE models
            return add(h, self.feed_forward(f), ctx.ops)
        return add(h, self.feed_forward(f, ctx), ctx.ops)
