"""What every format reader returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from souverain.model.args import ModelArgs
from souverain.weights.names import Target

TensorStream = Iterator[tuple[Target, torch.Tensor]]


@dataclass
class Checkpoint:
    """A checkpoint opened and validated, its tensors not yet read.

    `tensors()` yields (our name, tensor) in the checkpoint's dtype (dequantised to fp32 for
    quantised GGUF types), already in our layout (Q/K rotary permutation undone).
    """

    path: Path
    format: str  # "hf", "mistral" or "gguf"
    args: ModelArgs
    tensors: Callable[[], TensorStream]
    metadata: dict[str, object] = field(default_factory=dict)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rotary layout (Meta/Mistral consolidated, llama.cpp) -> rotate-half (HF, ours).

    Rows of one head are stored as pairs (x0, x1), (x2, x3)...; we want all first halves, then all
    second halves. Works for weights [out, in] and biases [out].
    """
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half -> interleaved: the inverse of `unpermute_rotary` (used to write test files)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(out, *rest)


def to_rotate_half(stream: TensorStream, args: ModelArgs) -> TensorStream:
    """Undo the interleaved rotary layout of wq/wk (weights and biases) in a tensor stream."""
    for target, t in stream:
        if ".attention.wq." in target.name:
            t = unpermute_rotary(t, args.n_heads)
        elif ".attention.wk." in target.name:
            t = unpermute_rotary(t, args.n_kv_heads)
        yield target, t
