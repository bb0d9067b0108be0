"""GGUF checkpoints (llama.cpp's `llama` architecture, used by Llama, Mistral and Mixtral GGUFs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from souverain.model.args import ModelArgs, MoeArgs
from souverain.weights.checkpoint import Checkpoint, TensorStream, to_rotate_half
from souverain.weights.errors import WeightsError
from souverain.weights.gguf_file import GGUFFile, TensorInfo
from souverain.weights.names import gguf_name

ARCHITECTURES = ("llama",)


def gguf_args(g: GGUFFile) -> ModelArgs:
    arch = g.field("general.architecture")
    if arch not in ARCHITECTURES:
        raise WeightsError(g.path, f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default: Any = KeyError) -> Any:
        value = g.field(f"{arch}.{name}", default)
        if value is KeyError:
            raise WeightsError(g.path, f"metadata {arch}.{name} is missing")
        return value

    names = {t.name for t in g.tensors}
    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = len(g.field("tokenizer.ggml.tokens", ()))
    experts = int(key("expert_count", 0))
    heads = int(key("attention.head_count"))
    rope_freqs = next((t for t in g.tensors if t.name == "rope_freqs.weight"), None)
    try:
        return ModelArgs(
            dim=int(key("embedding_length")),
            n_layers=int(key("block_count")),
            n_heads=heads,
            n_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=key("attention.key_length", None),
            hidden_dim=int(key("expert_feed_forward_length", 0) or key("feed_forward_length")),
            vocab_size=int(vocab),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_freq_factors=tuple(_dequantize(g, rope_freqs).tolist()) if rope_freqs else None,
            max_seq_len=int(key("context_length", 4096)),
            sliding_window=key("attention.sliding_window", None),
            tie_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            moe=MoeArgs(experts, int(key("expert_used_count"))) if experts else None,
        )
    except (TypeError, ValueError) as e:
        raise WeightsError(g.path, f"bad model metadata: {e}") from None


def _dequantize(g: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """Any supported tensor type -> a torch tensor of `info.shape` (F32/F16/BF16 zero-copy)."""
    raw = g.raw(info)
    if info.type == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view(np.float32))
    if info.type == GGMLQuantizationType.F16:
        return torch.from_numpy(raw.view(np.float16))
    if info.type == GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(quants.dequantize(raw, info.type))
    except NotImplementedError:
        raise WeightsError(g.path, f"tensor {info.name!r}: type {info.type.name} is not supported") from None


def read_gguf(path: Path) -> Checkpoint:
    g = GGUFFile(path)
    args = gguf_args(g)
    targets = []
    for info in g.tensors:
        try:
            targets.append((gguf_name(info.name), info))
        except KeyError:
            raise WeightsError(path, f"unexpected tensor {info.name!r}") from None

    def stream() -> TensorStream:
        for target, info in targets:
            if target is not None:
                yield target, _dequantize(g, info)

    return Checkpoint(path, "gguf", args, lambda: to_rotate_half(stream(), args), {"gguf": g.metadata})
