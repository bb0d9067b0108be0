"""LoRA adapters on disk: ours (written by fine-tuning jobs), PEFT's and Mistral's (read for import).

Ours: `adapter.safetensors` (layers.{i}.{target}.lora_A [r, in] / lora_B [out, r]) and `adapter.json`
(format, base, rank, alpha, targets). PEFT: `adapter_config.json` + `adapter_model.safetensors` with HF module
names. Mistral: `lora.safetensors` (+ `params.json` with `lora.rank` and `lora.scaling`), whose wq/wk rows are
in the interleaved rotary layout and are turned into ours like the base weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from souverain.model.args import ModelArgs
from souverain.model.lora import TARGETS, LoraArgs, LoraWeights
from souverain.weights.checkpoint import unpermute_rotary

FORMAT = "souverain-lora"
HF_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
              "down_proj": "w2", "up_proj": "w3"}


class AdapterError(ValueError):
    """A folder that is not a usable adapter for this model."""


def save_adapter(folder: Path, lora: LoraWeights, *, base: str, meta: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in lora.tensors().items()}, str(folder / "adapter.safetensors"))
    info = {"format": FORMAT, "base": base, "rank": lora.args.rank, "alpha": lora.args.alpha,
            "targets": list(lora.args.targets), **(meta or {})}
    (folder / "adapter.json").write_text(json.dumps(info, indent=2))


def read_info(folder: Path) -> dict[str, Any]:
    path = folder / "adapter.json"
    if not path.exists():
        raise AdapterError(f"{folder}: no adapter.json")
    info: dict[str, Any] = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a {FORMAT} adapter")
    return info


def load_adapter(folder: Path, model_args: ModelArgs, dtype: torch.dtype = torch.float32) -> LoraWeights:
    info = read_info(folder)
    lora = LoraWeights(model_args, LoraArgs(int(info["rank"]), float(info["alpha"]), tuple(info["targets"])), dtype)
    try:
        lora.load_tensors(load_file(str(folder / "adapter.safetensors")))
    except ValueError as e:
        raise AdapterError(f"{folder}: {e} (was it trained for another base model?)") from None
    return lora.eval().requires_grad_(False)


def _collect(tensors: dict[str, torch.Tensor], pattern: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = re.search(pattern, key)
        if m and m.group(2) in names:
            out[f"layers.{m.group(1)}.{names[m.group(2)]}.lora_{m.group(3)}"] = t.float()
    return out


def read_peft(folder: Path) -> tuple[LoraArgs, dict[str, torch.Tensor]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("use_rslora"):
        raise AdapterError(f"{folder}: DoRA and rsLoRA adapters are not supported")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    ours = _collect(tensors, r"layers\.(\d+)\.\w+\.(\w+_proj)\.lora_([AB])\.weight$", HF_TARGETS)
    targets = tuple(sorted({k.split(".")[2] for k in ours}, key=TARGETS.index))
    if not targets:
        raise AdapterError(f"{folder}: no LoRA tensors for attention or MLP projections")
    return LoraArgs(int(config["r"]), float(config.get("lora_alpha", config["r"])), targets), ours


def read_mistral(folder: Path, model_args: ModelArgs) -> tuple[LoraArgs, dict[str, torch.Tensor]]:
    params = json.loads((folder / "params.json").read_text()) if (folder / "params.json").exists() else {}
    tensors = load_file(str(folder / "lora.safetensors"))
    names = {t: t for t in TARGETS}
    ours = _collect(tensors, r"layers\.(\d+)\.\w+\.(w[qkvo123])\.lora_([AB])\.weight$", names)
    if not ours:
        raise AdapterError(f"{folder}: lora.safetensors holds no layers.N.<module>.w*.lora_A/B.weight tensors")
    for key in list(ours):  # interleaved rotary rows -> rotate-half, as for the base weights
        if key.endswith(".wq.lora_B"):
            ours[key] = unpermute_rotary(ours[key], model_args.n_heads)
        elif key.endswith(".wk.lora_B"):
            ours[key] = unpermute_rotary(ours[key], model_args.n_kv_heads)
    rank = int(params.get("lora", {}).get("rank") or next(t for k, t in ours.items() if k.endswith("lora_A")).shape[0])
    scaling = float(params.get("lora", {}).get("scaling", 2.0))
    targets = tuple(sorted({k.split(".")[2] for k in ours}, key=TARGETS.index))
    return LoraArgs(rank, scaling * rank, targets), ours


def import_adapter(source: Path, dest: Path, model_args: ModelArgs, *, base: str,
                   meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a PEFT or Mistral adapter (or copy ours) into `dest`, checked against the base model's shapes."""
    if (source / "adapter_config.json").exists():
        args, tensors = read_peft(source)
        kind = "peft"
    elif (source / "lora.safetensors").exists():
        args, tensors = read_mistral(source, model_args)
        kind = "mistral"
    elif (source / "adapter.json").exists():
        info = read_info(source)
        args = LoraArgs(int(info["rank"]), float(info["alpha"]), tuple(info["targets"]))
        tensors = load_file(str(source / "adapter.safetensors"))
        kind = FORMAT
    else:
        raise AdapterError(f"{source}: no adapter_config.json (PEFT), lora.safetensors (Mistral) or adapter.json")
    lora = LoraWeights(model_args, args)
    try:
        lora.load_tensors(tensors)
    except ValueError as e:
        raise AdapterError(f"{source}: {e}; is {base!r} its base model?") from None
    save_adapter(dest, lora, base=base, meta={"imported_from": kind, **(meta or {})})
    return read_info(dest)
