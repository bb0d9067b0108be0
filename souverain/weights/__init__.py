"""Checkpoint formats -> (ModelArgs, named tensors) -> a loaded Transformer.

Names are resolved lazily so that the torch-free parts (the GGUF parser, which the tokenizer
package reads metadata with) import without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Checkpoint", "WeightsError", "load_model", "open_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "WeightsError":
        from souverain.weights.errors import WeightsError

        return WeightsError
    if name in ("Checkpoint", "load_model", "open_checkpoint"):
        from souverain.weights import load

        return getattr(load, name)
    raise AttributeError(name)
