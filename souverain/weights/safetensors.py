"""Hugging Face layout: config.json + model.safetensors (or shards with an index)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from souverain.model.args import ModelArgs, MoeArgs, RopeScaling
from souverain.weights.checkpoint import Checkpoint, TensorStream
from souverain.weights.errors import WeightsError, missing_weights
from souverain.weights.names import Target, hf_name

SUPPORTED = ("llama", "mistral", "mixtral")


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open (mmap) with its errors turned into a WeightsError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise WeightsError(path, f"not a valid safetensors file ({e})") from None


def check_safetensors(path: Path) -> list[str]:
    """Parse and validate the header (extents included) now, so errors surface at open time."""
    with open_safetensors(path) as f:
        return list(f.keys())


def stream_safetensors(files: list[Path], name_map: Callable[[str], Target | None]) -> TensorStream:
    """(our name, tensor) for every tensor of `files`; a name the map does not know is an error."""
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                try:
                    target = name_map(key)
                except KeyError:
                    raise WeightsError(file, f"unexpected tensor {key!r}") from None
                if target is not None:
                    yield target, f.get_tensor(key)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(path, f"cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(path, "expected a JSON object")
    return data


def hf_args(config: dict[str, Any], path: Path) -> ModelArgs:
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise WeightsError(path, f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    # transformers 5 nests rope settings in `rope_parameters`; 4.x had rope_theta + rope_scaling.
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    moe = None
    if kind == "mixtral":
        moe = MoeArgs(config["num_local_experts"], config["num_experts_per_tok"])
    heads = config["num_attention_heads"]
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim"),
            hidden_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope, path),
            max_seq_len=config.get("max_position_embeddings", 4096),
            sliding_window=config.get("sliding_window") if kind != "llama" else None,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            moe=moe,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(path, f"bad config: {e}") from None


def _rope_scaling(rope: dict[str, Any], path: Path) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                           float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    raise WeightsError(path, f"rope scaling {kind!r} is not supported")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(index, "no weight_map")
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:  # a shard must sit beside the index
                raise WeightsError(index, f"shard name {name!r} points outside the model folder")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise missing_weights(folder, sorted(folder.iterdir()), "model.safetensors or model.safetensors.index.json")


def read_hf(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    config = read_json(config_path)
    args = hf_args(config, config_path)
    files = _weight_files(folder)
    for file in files:
        if not file.exists():
            raise WeightsError(file, "shard listed in the index is missing")
        check_safetensors(file)

    def name_map(key: str) -> Target | None:
        target = hf_name(key)
        # Tied checkpoints sometimes store lm_head too; the embedding is the one we use.
        if target is not None and args.tie_embeddings and target.name == "output.weight":
            return None
        return target

    return Checkpoint(folder, "hf", args, lambda: stream_safetensors(files, name_map),
                      {"config": config})
