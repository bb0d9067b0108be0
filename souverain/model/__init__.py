"""The transformer itself: torch only, no files, no requests."""

from souverain.model.args import ModelArgs, MoeArgs, RopeScaling
from souverain.model.kv import ContiguousKV, KVView
from souverain.model.transformer import Transformer

__all__ = ["ContiguousKV", "KVView", "ModelArgs", "MoeArgs", "RopeScaling", "Transformer"]
