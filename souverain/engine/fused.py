"""A decode step's decoder layers in one C++ call (`Decoder`, souverain/kernels/decoder.cpp).

Between its kernels the Python forward spends about 0.3 ms a layer on module calls, checks and
views: on SmolLM2 (30 layers) ~9 ms of a ~21 ms batch-1 decode step. The C++ decoder runs the same
ops in the same order on the same tensors, so its output is the Python path's to the bit. It covers
bf16 models on the CPU whose layers are plain (a dense feed-forward, or a mixture of experts with
quantised experts; nn.Linear or QuantLinear projections) and shapes the kernels take; the runner uses
it for steps of decodes only without LoRA, and the Python forward for everything else.
"""

from __future__ import annotations

from typing import Any

import torch

from souverain.kernels.backend import Backend
from souverain.model.layers import FeedForward, TransformerBlock
from souverain.model.moe import MoeFeedForward
from souverain.model.quant import kernel_linear
from souverain.model.transformer import Transformer


def build_decoder(model: Transformer, backend: Backend, block_size: int) -> Any | None:
    """The C++ decoder over `model`'s layers (sharing their tensors, as `prepare` packed them for
    `backend`), or None where it does not apply."""
    fast = backend.ops
    if fast is None:
        return None
    args = model.args
    p = next(model.parameters())
    width = fast.vector_width()
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or args.dim % width \
            or (args.hd // 2) % width or not fast.decode_supported(args.n_heads, args.n_kv_heads, args.hd, block_size):
        return None
    layers = []
    for block in model.layers:
        if not isinstance(block, TransformerBlock):
            return None
        att, ff = block.attention, block.feed_forward
        qkv = [att.wqkv] if att.wqkv is not None else [att.wq, att.wk, att.wv]
        attention = [kernel_linear(fast, m) for m in [*qkv, att.wo]]
        norms = dict(attention_norm=block.attention_norm.weight.detach(), ffn_norm=block.ffn_norm.weight.detach())
        if isinstance(ff, MoeFeedForward):  # its experts quantised, as `serve` runs them: the module's C++ form
            moe = ff.fused
            if moe is None or any(part is None for part in attention):
                return None
            layers.append(fast.Layer(**norms, qkv=attention[:-1], wo=attention[-1], moe=moe))
            continue
        if not isinstance(ff, FeedForward):
            return None
        gate_up = [ff.w13] if ff.w13 is not None else [ff.w1, ff.w3]
        parts = [*attention, *[kernel_linear(fast, m) for m in [*gate_up, ff.w2]]]
        if any(part is None for part in parts):
            return None
        n = len(qkv)
        layers.append(fast.Layer(**norms, qkv=parts[:n], wo=parts[n], gate_up=parts[n + 1 : -1], down=parts[-1]))
    return fast.Decoder(layers, args.n_heads, args.n_kv_heads, args.hd, args.norm_eps)
