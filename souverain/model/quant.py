"""Weight-only int8 linear layers for fast CPU decoding (a module swap, as LoRA will be).

Decoding one token at a time is bound by reading the weights: int8 halves the bytes of bf16.
Each output row gets one scale (symmetric, per channel); activations stay bf16, which is what
torch's `_weight_int8pack_mm` CPU kernel is fast with. Large batches (prefill) are
compute-bound, so they use a bf16 copy kept alongside: `dense_rows` sets the switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from souverain.model.transformer import Transformer


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, dense_rows: int) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
        self.qweight = nn.Buffer(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.scales = nn.Buffer(scales.to(torch.bfloat16))
        self.dense = nn.Buffer(linear.weight.detach().to(torch.bfloat16))
        self.bias = linear.bias
        self.dense_rows = dense_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if x2.shape[0] > self.dense_rows:
            y = F.linear(x2, self.dense)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, *, dense_rows: int = 8) -> nn.Module:
    """Swap every nn.Linear for an Int8Linear, in place (MoE expert stacks stay as they are).
    A tied output projection gets its own int8 copy of the embedding matrix."""
    if isinstance(model, Transformer) and model.output is None:
        tied = nn.Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
        tied.weight = model.tok_embeddings.weight
        model.output = Int8Linear(tied, dense_rows)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child, dense_rows))
        else:
            quantize_int8(child, dense_rows=dense_rows)
    return model
