"""Sparse mixture-of-experts feed-forward (Mixtral): a router picks the top-k experts per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from souverain.model.args import ModelArgs


class MoeFeedForward(nn.Module):
    """Experts are stacked: w1, w3 [E, F, D] and w2 [E, D, F]. Tokens are sorted by expert and each
    expert runs once on its contiguous group, so the cost is one matmul chain per active expert."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        assert args.moe is not None
        e, d, f = args.moe.num_experts, args.dim, args.hidden_dim
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, f, d))
        self.w2 = nn.Parameter(torch.empty(e, d, f))
        self.w3 = nn.Parameter(torch.empty(e, f, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # Softmax over the chosen k only (= full softmax, top-k, renormalise), in fp32.
        logits = self.gate(x)  # [N, E]
        top_logits, experts = torch.topk(logits.float(), self.top_k, dim=-1)  # [N, k]
        weights = F.softmax(top_logits, dim=-1).to(x.dtype)

        flat = experts.flatten()  # [N*k]
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # which token each sorted slot belongs to
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        grouped = x[token_of]  # [N*k, D], grouped by expert
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = grouped[start : start + n]
            outs.append(F.linear(F.silu(F.linear(seg, self.w1[e])) * F.linear(seg, self.w3[e]), self.w2[e]))
            start += n
        y = torch.cat(outs) * weights.flatten()[order, None]  # [N*k, D]
        out = torch.zeros_like(x).index_add_(0, token_of, y)
        return out.view(shape)
