"""A BERT-style encoder (sentence-transformers embedding models such as all-MiniLM-L6-v2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderArgs:
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12


class EncoderLayer(nn.Module):
    def __init__(self, args: EncoderArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.wqkv = nn.Linear(args.dim, 3 * args.dim)
        self.wo = nn.Linear(args.dim, args.dim)
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.w1 = nn.Linear(args.dim, args.hidden_dim)
        self.w2 = nn.Linear(args.hidden_dim, args.dim)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; mask [B, 1, 1, T] True for real tokens. Post-norm, as BERT."""
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # [B,H,T,hd]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, d)
        h = self.attention_norm(x + self.wo(a))
        return self.ffn_norm(h + self.w2(F.gelu(self.w1(h))))


class Encoder(nn.Module):
    def __init__(self, args: EncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_positions, args.dim)
        self.type_embeddings = nn.Embedding(args.type_vocab_size, args.dim)
        self.embedding_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(args) for _ in range(args.n_layers))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """tokens, attention_mask [B, T] -> hidden states [B, T, D]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos_embeddings(positions)[None] + self.type_embeddings.weight[0]
        h = self.embedding_norm(h)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask)
        return h


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean over real tokens, then unit length (sentence-transformers' Pooling + Normalize)."""
    m = attention_mask[..., None].to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
