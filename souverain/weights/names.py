"""Pure name maps from each format's tensor names to ours. No tensors here.

Each map returns a `Target` (our name, and the expert index when a format stores MoE experts one
tensor each and we stack them), or None for a tensor we deliberately skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    expert: int | None = None


_HF_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "block_sparse_moe.gate": "feed_forward.gate",
}
_HF_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_SKIP = re.compile(r".*rotary_emb\.inv_freq")


def hf_name(name: str) -> Target | None:
    """HF transformers names (Llama, Mistral, Mixtral) -> ours."""
    if _HF_SKIP.fullmatch(name):
        return None
    if m := _HF_EXPERT.fullmatch(name):
        return Target(f"layers.{m[1]}.feed_forward.{m[3]}", int(m[2]))
    if (m := _HF_LAYER_RE.fullmatch(name)) and m[2] in _HF_LAYER:
        return Target(f"layers.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}")
    stem, _, kind = name.rpartition(".")
    if stem in _HF_TOP:
        return Target(f"{_HF_TOP[stem]}.{kind}")
    raise KeyError(name)


_MISTRAL_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_MISTRAL_PLAIN = re.compile(
    r"(tok_embeddings|norm|output)\.weight"
    r"|layers\.\d+\.(attention\.w[qkvo]|attention_norm|ffn_norm|feed_forward\.(w[123]|gate))\.(weight|bias)"
)


def mistral_name(name: str) -> Target | None:
    """Mistral consolidated names are ours already, but for per-expert MoE tensors."""
    if m := _MISTRAL_EXPERT.fullmatch(name):
        return Target(f"layers.{m[1]}.feed_forward.{m[3]}", int(m[2]))
    if _MISTRAL_PLAIN.fullmatch(name):
        return Target(name)
    raise KeyError(name)


_GGUF_LAYER = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "ffn_gate_inp": "feed_forward.gate",
    # Stacked experts [E, ...], already our layout.
    "ffn_gate_exps": "feed_forward.w1",
    "ffn_down_exps": "feed_forward.w2",
    "ffn_up_exps": "feed_forward.w3",
}
_GGUF_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)(?:\.(\d+))?\.(weight|bias)")


def gguf_name(name: str) -> Target | None:
    """llama.cpp `llama`-architecture names -> ours (old per-expert `ffn_gate.E` included)."""
    if name == "rope_freqs.weight":
        return None  # folded into ModelArgs.rope_freq_factors by the reader
    if (m := _GGUF_LAYER_RE.fullmatch(name)) and m[2] in _GGUF_LAYER:
        ours = f"layers.{m[1]}.{_GGUF_LAYER[m[2]]}"
        if m[3] is not None:  # one expert of an old-style MoE file
            return Target(ours, int(m[3]))
        return Target(ours if m[2].endswith("_exps") else f"{ours}.{m[4]}")
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return Target(f"{_GGUF_TOP[stem]}.{kind}")
    raise KeyError(name)
