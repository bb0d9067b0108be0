"""The decoder-only transformer: embeddings, N blocks, final norm, output projection."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from souverain.model.args import ModelArgs
from souverain.model.attention import window_mask
from souverain.model.kv import KVView
from souverain.model.layers import ForwardContext, PromptRows, RMSNorm, TransformerBlock
from souverain.model.lora import LoraBatch
from souverain.model.rope import rope_cos_sin, rope_inv_freq


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models (SmolLM2) project with the embedding matrix and own no output weight.
        self.output: nn.Module | None = None
        if not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: it stays fp32 whatever dtype the weights take,
        # and is built on the CPU even under a `meta` device context.
        self._inv_freq = rope_inv_freq(args)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv: KVView | None = None, output_rows: torch.Tensor | None = None,
                lora: LoraBatch | None = None, ops: ModuleType | None = None,
                prompt: PromptRows | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V].

        positions [B, T] defaults to 0..T-1. Without `kv` this is plain causal attention over the
        given tokens (positions then must run on without gaps); with `kv` the view stores this
        step's keys/values and attends over what it holds. `output_rows` (indices into the
        flattened B*T tokens) asks for those rows' logits only: [R, V]. `lora` adds adapters' updates
        to the rows it names. `ops`: the backend's C++ kernels for the element-wise ops and attention
        (None: PyTorch ops); the projections use what `prepare` packed them for. `prompt`: which rows
        are prompt tokens (None: none), for projections that compute those their own way.
        """
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_tables(positions, h.dtype)
        ctx = ForwardContext(cos, sin, positions, self._mask(positions) if kv is None else None, kv, lora, ops, prompt)
        for layer in self.layers:
            h = layer(h, ctx)
        if output_rows is not None:
            h = h.reshape(b * t, -1)[output_rows]
        return self.head(h, ops)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., head_dim] for integer positions [...]."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return rope_cos_sin(self._inv_freq, positions, dtype)

    def head(self, h: torch.Tensor, ops: ModuleType | None = None) -> torch.Tensor:
        """The last hidden states [..., D] -> logits [..., V]: final norm, output projection."""
        h = self.norm(h, ops)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def _mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        window = self.args.sliding_window
        if window is None or positions.shape[1] <= window:
            return None  # plain causal
        return window_mask(positions, positions, window)
