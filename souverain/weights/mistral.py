"""Mistral's own layout: params.json + consolidated.safetensors (the mistral-inference format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from souverain.model.args import ModelArgs, MoeArgs, RopeScaling
from souverain.weights.checkpoint import Checkpoint, TensorStream, to_rotate_half
from souverain.weights.errors import WeightsError, missing_weights
from souverain.weights.names import mistral_name
from souverain.weights.safetensors import check_safetensors, read_json, stream_safetensors


def mistral_args(params: dict[str, Any], path: Path) -> ModelArgs:
    moe = params.get("moe")
    try:
        return ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            head_dim=params.get("head_dim"),
            hidden_dim=params["hidden_dim"],
            vocab_size=params["vocab_size"],
            norm_eps=params.get("norm_eps", 1e-5),
            # Mistral 7B v0.1 ships no rope_theta: mistral-inference's default is 10000.
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=_meta_scaled_rope(params),
            max_seq_len=params.get("max_seq_len") or params.get("max_position_embeddings") or 32768,
            sliding_window=params.get("sliding_window"),
            tie_embeddings=bool(params.get("tied_embeddings", False)),
            moe=MoeArgs(moe["num_experts"], moe["num_experts_per_tok"]) if moe else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(path, f"bad params: {e}") from None


def _meta_scaled_rope(params: dict[str, Any]) -> RopeScaling | None:
    # Meta's Llama 3.1 ships the same layout with `use_scaled_rope` and fixed constants in its code.
    if params.get("use_scaled_rope"):
        return RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    return None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated*.safetensors"))
    if files:
        return files
    raise missing_weights(folder, sorted(folder.glob("consolidated*")), "consolidated.safetensors beside params.json")


def read_mistral(folder: Path) -> Checkpoint:
    params_path = folder / "params.json"
    params = read_json(params_path)
    args = mistral_args(params, params_path)
    files = _weight_files(folder)
    for file in files:
        check_safetensors(file)

    def tensors() -> TensorStream:
        return to_rotate_half(stream_safetensors(files, mistral_name), args)

    return Checkpoint(folder, "mistral", args, tensors, {"params": params})
