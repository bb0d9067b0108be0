"""The KV view a forward pass reads and writes. The model never owns request state: the caller
passes a view in (the engine passes its paged one; this contiguous one serves simple generation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from souverain.model.transformer import Transformer


class KVView(Protocol):
    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [B, S] of the keys that attention will see once this step's tokens (at
        `positions` [B, T]) are written; -1 marks an empty slot."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, T, Hkv, Dh] for `layer`; return all keys/values [B, S, Hkv, Dh]."""
        ...


class ContiguousKV:
    """One [B, max_len, Hkv, Dh] buffer per layer; the slot of a token is its position.

    Call `prepare(positions)` before each forward (the Transformer does it through key_positions).
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self._positions: torch.Tensor | None = None
        self._length = 0

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> ContiguousKV:
        args = model.args
        p = next(model.parameters())
        return cls(args.n_layers, batch, max_len, args.n_kv_heads, args.hd, p.dtype, p.device)

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        top = int(positions.max()) + 1
        if top > self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len}), got up to {top - 1}")
        self._positions = positions
        self._length = top
        # Slots past a row's own positions hold stale or zero values: the causal mask hides them.
        keys = torch.arange(top, device=positions.device)
        return keys.expand(positions.shape[0], top)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._positions is not None, "key_positions() must be called before update()"
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.k[layer][rows, self._positions] = k
        self.v[layer][rows, self._positions] = v
        return self.k[layer][:, : self._length], self.v[layer][:, : self._length]
