"""Souverain: a self-hosted, open-weight AI platform."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import souverain` costs nothing and pulls in no torch.
    if name == "load_model":
        from souverain.weights.load import load_model

        return load_model
    if name == "load_tokenizer":
        from souverain.tokenizer.load import load_tokenizer

        return load_tokenizer
    raise AttributeError(name)
