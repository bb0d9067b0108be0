"""Open any supported checkpoint and build a Transformer from it (on `meta`, then assign)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from souverain.model.transformer import Transformer
from souverain.weights.checkpoint import Checkpoint
from souverain.weights.errors import PICKLE_SUFFIXES, WeightsError, refuse_pickle
from souverain.weights.gguf import read_gguf
from souverain.weights.mistral import read_mistral
from souverain.weights.safetensors import read_hf


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A `.gguf` file, or a folder in HF layout (config.json) or Mistral layout (params.json).

    A folder with both is read in Mistral layout: mistralai repos ship both, and the consolidated
    file is one read instead of several shards.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "no such file or folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise refuse_pickle(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return read_gguf(path)
        raise WeightsError(path, "not a GGUF file; pass the model folder for safetensors checkpoints")
    if (path / "params.json").exists() and any(path.glob("consolidated*")):
        return read_mistral(path)
    if (path / "config.json").exists():
        return read_hf(path)
    raise WeightsError(path, "no config.json (HF layout) or params.json (Mistral layout) in this folder")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", bits: int = 0) -> Transformer:
    """Load a checkpoint into a Transformer in eval mode. `bits` 4 or 8 swaps in weight-only
    quantised linears (bf16 activations, so `dtype` is then bfloat16)."""
    if bits:
        dtype = torch.bfloat16
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    state = collect_state(ckpt, dtype, torch.device(device))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(ckpt.path, f"tensors do not fit the model: {e}") from None
    if bits:
        from souverain.model.quant import quantize

        quantize(model, bits=bits)
    return model.eval()


def collect_state(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read every tensor, stacking per-expert MoE tensors into [E, ...]."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for target, tensor in ckpt.tensors():
        tensor = tensor.to(device=device, dtype=dtype)
        if target.expert is None:
            if target.name in state:
                raise WeightsError(ckpt.path, f"tensor {target.name} appears twice")
            state[target.name] = tensor
        else:
            experts[target.name][target.expert] = tensor
    n_experts = ckpt.args.moe.num_experts if ckpt.args.moe else 0
    for name, parts in experts.items():
        if sorted(parts) != list(range(n_experts)):
            raise WeightsError(ckpt.path, f"{name}: experts {sorted(parts)} found, {n_experts} expected")
        state[name] = torch.stack([parts[e] for e in range(n_experts)])
    return state
