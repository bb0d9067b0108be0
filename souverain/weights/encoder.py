"""Load a BERT-family sentence-embedding model folder (config.json + model.safetensors)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from souverain.model.encoder import Encoder, EncoderArgs
from souverain.weights.errors import WeightsError
from souverain.weights.safetensors import check_safetensors, open_safetensors, read_json

_TOP = {
    "embeddings.word_embeddings.weight": "tok_embeddings.weight",
    "embeddings.position_embeddings.weight": "pos_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embedding_norm.weight",
    "embeddings.LayerNorm.bias": "embedding_norm.bias",
}
_LAYER = {
    "attention.output.dense": "wo", "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "w1", "output.dense": "w2", "output.LayerNorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def load_encoder(folder: Path, dtype: torch.dtype = torch.float32) -> Encoder:
    config = read_json(folder / "config.json")
    if config.get("model_type") not in ("bert",):
        raise WeightsError(folder / "config.json", f"model_type {config.get('model_type')!r} is not an encoder we run")
    args = EncoderArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                       n_heads=config["num_attention_heads"], hidden_dim=config["intermediate_size"],
                       vocab_size=config["vocab_size"], max_positions=config.get("max_position_embeddings", 512),
                       type_vocab_size=config.get("type_vocab_size", 2), norm_eps=config.get("layer_norm_eps", 1e-12))
    path = folder / "model.safetensors"
    check_safetensors(path)
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with open_safetensors(path) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            name = key.removeprefix("bert.")
            if name in _TOP:
                state[_TOP[name]] = f.get_tensor(key).to(dtype)
            elif m := _LAYER_RE.fullmatch(key):
                layer, part, kind = int(m[1]), m[2], m[3]
                if part.startswith("attention.self."):  # query/key/value: fused into wqkv
                    qkv.setdefault((layer, kind), {})[part.rsplit(".", 1)[1]] = f.get_tensor(key).to(dtype)
                elif part in _LAYER:
                    state[f"layers.{layer}.{_LAYER[part]}.{kind}"] = f.get_tensor(key).to(dtype)
    for (layer, kind), parts in qkv.items():
        state[f"layers.{layer}.wqkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    with torch.device("meta"):
        model = Encoder(args)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(path, f"tensors do not fit the encoder: {e}") from None
    return model.eval()
