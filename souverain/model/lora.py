"""LoRA: low-rank updates of the attention and MLP projections, passed to `forward` like the KV view.

An adapter never changes the base model. `LoraBatch` says which token rows of a forward use which adapter,
so one step can mix the base model and several adapters (rows with no adapter get the base output), and the
training loop uses the very same path with one adapter on every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from souverain.model.args import ModelArgs

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraArgs:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be at least 1")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)} (known: {', '.join(TARGETS)})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """target -> (in_features, out_features) of the base projection."""
    q, kv = args.n_heads * args.hd, args.n_kv_heads * args.hd
    return {"wq": (args.dim, q), "wk": (args.dim, kv), "wv": (args.dim, kv), "wo": (q, args.dim),
            "w1": (args.dim, args.hidden_dim), "w2": (args.hidden_dim, args.dim), "w3": (args.dim, args.hidden_dim)}


class LoraWeights(nn.Module):
    """One adapter: A [r, in] and B [out, r] for each (layer, target). B starts at zero: a new adapter is a no-op."""

    def __init__(self, model_args: ModelArgs, args: LoraArgs, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if model_args.moe is not None and {"w1", "w2", "w3"} & set(args.targets):
            args = LoraArgs(args.rank, args.alpha, tuple(t for t in args.targets if t not in ("w1", "w2", "w3")))
        self.args = args
        shapes = projection_shapes(model_args)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for layer in range(model_args.n_layers):
            for t in args.targets:
                fan_in, fan_out = shapes[t]
                a = torch.empty(args.rank, fan_in, dtype=dtype)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT and the LoRA paper's code
                self.a[f"{layer}_{t}"] = nn.Parameter(a)
                self.b[f"{layer}_{t}"] = nn.Parameter(torch.zeros(fan_out, args.rank, dtype=dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for saving: layers.{i}.{target}.lora_A / lora_B."""
        out = {}
        for key, a in self.a.items():
            layer, target = key.split("_", 1)
            out[f"layers.{layer}.{target}.lora_A"] = a.detach()
            out[f"layers.{layer}.{target}.lora_B"] = self.b[key].detach()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `tensors`; every tensor must be there with its shape."""
        with torch.no_grad():
            for key, a in self.a.items():
                layer, target = key.split("_", 1)
                for name, dest in ((f"layers.{layer}.{target}.lora_A", a), (f"layers.{layer}.{target}.lora_B",
                                                                            self.b[key])):
                    if name not in tensors:
                        raise ValueError(f"adapter lacks {name}")
                    if tuple(tensors[name].shape) != tuple(dest.shape):
                        raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, expected {tuple(dest.shape)}")
                    dest.copy_(tensors[name])


@dataclass
class LoraBatch:
    """Which rows of the flattened [B*T] tokens use which adapter."""

    adapters: list[LoraWeights]
    groups: list[tuple[int, torch.Tensor | None]]  # (adapter index, row indices; None = every row)

    @classmethod
    def single(cls, adapter: LoraWeights) -> LoraBatch:
        return cls([adapter], [(0, None)])

    @classmethod
    def from_slots(cls, adapters: list[LoraWeights], slots: list[int], device: torch.device) -> LoraBatch | None:
        """`slots[i]` is row i's adapter index, or -1 for the base model. None when no row has an adapter."""
        groups: list[tuple[int, torch.Tensor | None]] = []
        for i in sorted(set(slots) - {-1}):
            rows = [r for r, s in enumerate(slots) if s == i]
            groups.append((i, None if len(rows) == len(slots) else torch.tensor(rows, device=device)))
        return cls(adapters, groups) if groups else None

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x) plus each adapter's update on its rows."""
        key = f"{layer}_{target}"
        for index, rows in self.groups:
            adapter = self.adapters[index]
            if key not in adapter.a:
                continue
            a, b = adapter.a[key], adapter.b[key]
            scale = adapter.args.scale
            if rows is None:
                y = y + (x.to(a.dtype) @ a.t() @ b.t() * scale).to(y.dtype)
                continue
            x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            update = (x2[rows].to(a.dtype) @ a.t() @ b.t() * scale).to(y.dtype)  # [R, out]
            y = y2.index_add(0, rows, update).view_as(y)
        return y
