"""Adapters from PEFT and from Mistral's lora.safetensors give the same model as ours (merged-weights check)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from souverain.model.lora import LoraArgs, LoraBatch, LoraWeights
from souverain.train.adapter import AdapterError, import_adapter, load_adapter
from souverain.weights.checkpoint import permute_rotary
from tests.engine.test_lora import random_adapter
from tests.engine.toy import tiny_model

HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
      "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def logits(model: torch.nn.Module, adapter: LoraWeights) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(20).view(1, 20), lora=LoraBatch.single(adapter))


def test_peft_adapter_imports_exactly(tmp_path: Path) -> None:
    model = tiny_model("dense")
    ours = random_adapter(model, 3)
    src = tmp_path / "peft"
    src.mkdir()
    tensors = {}
    for name, t in ours.tensors().items():
        _, layer, target, ab = name.split(".")
        tensors[f"base_model.model.model.layers.{layer}.{HF[target]}.{ab}.weight"] = t.clone()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                         "target_modules": list(HF.values())}))
    import_adapter(src, tmp_path / "ours", model.args, base="tiny")
    assert torch.allclose(logits(model, load_adapter(tmp_path / "ours", model.args)), logits(model, ours), atol=1e-5)


def test_mistral_adapter_imports_exactly(tmp_path: Path) -> None:
    model = tiny_model("dense")
    ours = random_adapter(model, 4)
    src = tmp_path / "mistral"
    src.mkdir()
    names = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
             "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
    tensors = {}
    for name, t in ours.tensors().items():
        _, layer, target, ab = name.split(".")
        if ab == "lora_B" and target in ("wq", "wk"):  # Mistral's files use the interleaved rotary layout
            t = permute_rotary(t, model.args.n_heads if target == "wq" else model.args.n_kv_heads)
        tensors[f"layers.{layer}.{names[target]}.{ab}.weight"] = t.clone()
    save_file(tensors, str(src / "lora.safetensors"))
    (src / "params.json").write_text(json.dumps({"lora": {"rank": 4, "scaling": 2.0}}))
    import_adapter(src, tmp_path / "ours", model.args, base="tiny")
    assert torch.allclose(logits(model, load_adapter(tmp_path / "ours", model.args)), logits(model, ours), atol=1e-5)


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    model = tiny_model("dense")
    other = LoraWeights(model.args.__class__(**{**model.args.__dict__, "dim": 32, "head_dim": None}), LoraArgs(4, 8))
    src = tmp_path / "x"
    src.mkdir()
    mistral_names = {k.replace(".lora_", ".x.lora_").replace(".w", ".attention.w").replace(".x.", ".") + ".weight": v
                     for k, v in other.tensors().items()}
    save_file({k: v.contiguous() for k, v in mistral_names.items()}, str(src / "lora.safetensors"))
    try:
        import_adapter(src, tmp_path / "ours", model.args, base="tiny")
    except AdapterError as e:
        assert "shape" in str(e) and "base model" in str(e)
    else:
        raise AssertionError("a mismatched adapter was accepted")
