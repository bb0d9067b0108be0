"""Tokenizers (no torch): HF tokenizer.json, GGUF vocabularies, Mistral's own via mistral-common."""

from souverain.tokenizer.base import ChatMessage, Tokenizer
from souverain.tokenizer.incremental import IncrementalDecoder
from souverain.tokenizer.load import load_tokenizer

__all__ = ["ChatMessage", "IncrementalDecoder", "Tokenizer", "load_tokenizer"]
