"""The KV view a forward pass hands its attention to. The model never owns request state: the
caller passes a view in (the engine its paged one; ContiguousKV serves simple generation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from souverain.model.attention import attend, window_mask

if TYPE_CHECKING:
    from souverain.model.transformer import Transformer


class KVView(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Store this step's k, v [B, T, Hkv, hd] for `layer`, attend q [B, T, H, hd] over
        everything the view holds for those sequences; return [B, T, H, hd]."""
        ...


class ContiguousKV:
    """One [B, max_len, Hkv, hd] buffer per layer; a token's slot is its position. Every row's
    positions must be filled from 0 without gaps (the causal mask then hides unwritten slots)."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.window = window
        self._mask_for: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> ContiguousKV:
        args = model.args
        p = next(model.parameters())
        return cls(args.n_layers, batch, max_len, args.n_kv_heads, args.hd, args.sliding_window, p.dtype, p.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len})")
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v
        length = int(positions.max()) + 1
        return attend(q, self.k[layer][:, :length], self.v[layer][:, :length], self._mask(positions, length))

    def _mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        # Every layer asks with the same positions: build the mask once per forward.
        if self._mask_for is None or self._mask_for[0] is not positions:
            keys = torch.arange(length, device=positions.device).expand(positions.shape[0], length)
            self._mask_for = (positions, window_mask(positions, keys, self.window))
        return self._mask_for[1]
