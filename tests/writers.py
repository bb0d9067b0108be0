"""Test helpers: tiny random models built with transformers and written in every format we read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from souverain.model.args import ModelArgs
from souverain.model.rope import rope_inv_freq
from souverain.weights.checkpoint import permute_rotary
from souverain.weights.load import collect_state, open_checkpoint

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def build_hf(kind: str, folder: Path, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random-weight transformers model of `kind` (mistral, mixtral, llama), saved to `folder`."""
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[kind]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        # HF's init (std 0.02) gives near-uniform logits; larger weights make the comparison bite.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def our_state(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    ckpt = open_checkpoint(folder)
    return ckpt.args, collect_state(ckpt, torch.float32, torch.device("cpu"))


def _interleaved(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if ".attention.wq." in name:
        return permute_rotary(t, args.n_heads)
    if ".attention.wk." in name:
        return permute_rotary(t, args.n_kv_heads)
    return t


def write_mistral(args: ModelArgs, state: dict[str, torch.Tensor], folder: Path) -> None:
    """params.json + consolidated.safetensors, as mistral-inference ships them."""
    assert args.rope_scaling is None, "Mistral layout has no rope scaling field"
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if args.moe and name.endswith((".w1", ".w2", ".w3")):
            layer, w = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{layer}.experts.{e}.{w}.weight"] = t[e].contiguous()
        else:
            out[name] = _interleaved(name, t, args).contiguous()
    if args.tie_embeddings:
        out.pop("output.weight", None)
    save_file(out, str(folder / "consolidated.safetensors"))
    params = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.hd, "hidden_dim": args.hidden_dim,
              "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
              "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "tied_embeddings": args.tie_embeddings}
    if args.sliding_window:
        params["sliding_window"] = args.sliding_window
    if args.moe:
        params["moe"] = {"num_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.num_experts_per_tok}
    (folder / "params.json").write_text(json.dumps(params))


_GGUF_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
               "feed_forward.gate": "ffn_gate_inp"}


def gguf_tensor_name(name: str, moe: bool) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    if moe and rest in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        return f"blk.{layer}.{_GGUF_NAMES[rest]}_exps.weight"
    stem, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[stem]}.{kind}"


def quantize_roundtrip(t: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """What a tensor becomes after quantising to qtype and back (the reference for quantised files)."""
    q = quants.quantize(t.numpy().astype(np.float32), qtype)
    return torch.from_numpy(quants.dequantize(q, qtype).reshape(t.shape).copy())


# Where the fp16 super-block scales sit in each k-quant block (byte offsets), and the block size.
K_QUANT_SCALES = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)),
                  "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def random_k_quant(shape: tuple[int, ...], qtype: str, seed: int = 0) -> np.ndarray:
    """Valid random k-quant bytes (gguf-py cannot quantise to these types): random payload,
    small finite fp16 scales."""
    block, scale_offsets = K_QUANT_SCALES[qtype]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // 256
    data = rng.integers(0, 256, (n_blocks, block), dtype=np.uint8)
    for off in scale_offsets:
        data[:, off : off + 2] = rng.uniform(0.001, 0.01, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // 256 * block)


def write_gguf(args: ModelArgs, state: dict[str, torch.Tensor], path: Path,
               qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
               metadata: dict[str, object] | None = None) -> None:
    """A llama-architecture GGUF; tensors with 2+ dims in `qtype`, vectors in F32."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.sliding_window:
        # Our reader's key; llama.cpp's converter writes none for Mistral v0.1 (it runs it unwindowed).
        w.add_uint32("llama.attention.sliding_window", args.sliding_window)
    if args.moe:
        w.add_expert_count(args.moe.num_experts)
        w.add_expert_used_count(args.moe.num_experts_per_tok)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, int(value))  # type: ignore[call-overload]
    if args.rope_scaling:
        # llama.cpp stores scaled rope as per-frequency divisors in a `rope_freqs` tensor.
        plain = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
        w.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(args)).numpy())
    for name, t in state.items():
        data = _interleaved(name, t, args).contiguous().numpy().astype(np.float32)
        gname = gguf_tensor_name(name, args.moe is not None)
        if data.ndim >= 2 and qtype.name in K_QUANT_SCALES:
            w.add_tensor(gname, random_k_quant(data.shape, qtype.name), raw_dtype=qtype)
        elif data.ndim >= 2 and qtype != GGMLQuantizationType.F32:
            w.add_tensor(gname, quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
