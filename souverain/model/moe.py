"""Sparse mixture-of-experts feed-forward (Mixtral): a router picks the top-k experts per token."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from souverain.model.args import ModelArgs


class MoeFeedForward(nn.Module):
    """Experts are stacked: w1, w3 [E, F, D] and w2 [E, D, F]. Tokens are sorted by expert and each
    expert runs once on its contiguous group, so the cost is one matmul chain per active expert.
    `quantized(w13, w2)` swaps the stacks for one fused [gate | up] and one down projection module per
    expert (souverain.model.quant's QuantLinear: int4 weights, each token's result the same in any batch);
    `fused`, set by souverain.model.quant's `prepare` on a C++ kernel backend, is then the whole feed-forward
    in one C++ call (souverain/kernels/decoder.cpp's Moe: the same steps, plain loops between the experts'
    products instead of ~25 ATen ops; the C++ decoder runs the same object)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        e, d, f = args.moe.num_experts, args.dim, args.hidden_dim
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, f, d))
        self.w2 = nn.Parameter(torch.empty(e, d, f))
        self.w3 = nn.Parameter(torch.empty(e, f, d))
        self.w13s: nn.ModuleList | None = None
        self.w2s: nn.ModuleList | None = None
        self.fused: Any | None = None

    def quantized(self, w13: list[nn.Module], w2: list[nn.Module]) -> None:
        self.w13s, self.w2s = nn.ModuleList(w13), nn.ModuleList(w2)
        del self.w1, self.w2, self.w3

    def _expert(self, e: int, seg: torch.Tensor) -> torch.Tensor:
        if self.w13s is not None and self.w2s is not None:
            gate, up = self.w13s[e](seg).chunk(2, dim=-1)
            return self.w2s[e](F.silu(gate) * up)
        return F.linear(F.silu(F.linear(seg, self.w1[e])) * F.linear(seg, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        if self.fused is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and \
                not (torch.is_grad_enabled() and x.requires_grad):
            return self.fused(x).view(shape)
        # Softmax over the chosen k only (= full softmax, top-k, renormalise), in fp32.
        logits = self.gate(x)  # [N, E]
        top_logits, experts = torch.topk(logits.float(), self.top_k, dim=-1)  # [N, k]
        weights = F.softmax(top_logits, dim=-1).to(x.dtype)

        flat = experts.flatten()  # [N*k]
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # which token each sorted slot belongs to
        counts = torch.bincount(flat, minlength=self.gate.out_features).tolist()
        grouped = x[token_of]  # [N*k, D], grouped by expert
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = grouped[start : start + n]
            outs.append(self._expert(e, seg))
            start += n
        y = torch.cat(outs).to(x.dtype) * weights.flatten()[order, None]  # [N*k, D]
        # Each token's k outputs are added in expert order (the sort is stable), whatever its neighbours.
        out = torch.zeros_like(x).index_add_(0, token_of, y)
        return out.view(shape)
