"""Load the models a server serves, each behind its own engine."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.hub import resolve
from souverain.hub.describe import describe
from souverain.kernels.backend import choose
from souverain.model.quant import prepare, resolve_bits
from souverain.server.adapters import adapter_cache
from souverain.server.registry import LoadedEmbedder, LoadedModel, Registry
from souverain.server.settings import Settings
from souverain.tokenizer import load_tokenizer
from souverain.weights import load_model


def freeze_heap() -> None:
    """Once the models are loaded: the imports, models and tokenizers leave ~330k long-lived objects
    (SmolLM2); a full collection walks them all (~0.2 s, more in a process holding more), stalling every
    stream mid-generation. Collect once and keep them out of later collections (vLLM does the same)."""
    gc.collect()
    gc.freeze()


def load_models(settings: Settings, say: Callable[[str], None] = print) -> Registry:
    registry = Registry()
    for entry in settings.models:
        # "NAME=MODEL" serves MODEL (an installed name or a path) under the id NAME.
        name, _, ref = entry.partition("=") if "=" in entry else (entry, "", entry)
        path = resolve(ref)
        info = describe(path)
        if "embeddings" in info.get("capabilities", []):
            registry.add_embedder(LoadedEmbedder(name, Embedder(path), info))
            say(f"loaded {name} (embeddings, {info.get('architecture')})")
            continue
        bits = resolve_bits(settings.bits, info.get("quantization"))
        model = load_model(path, dtype=getattr(torch, settings.dtype), bits=bits)
        tokenizer = load_tokenizer(path)
        backend = choose(next(model.parameters()).device)
        engine = LLMEngine(prepare(model, backend), tokenizer,
                           EngineConfig(kv_cache_memory=settings.kv_cache_memory, max_waiting=settings.max_waiting),
                           adapters=adapter_cache(registry, name), backend=backend)
        async_engine = AsyncEngine(engine)
        async_engine.start()
        registry.add(LoadedModel(name, async_engine, tokenizer, info, path=path))
        say(f"loaded {name} ({info.get('architecture')}, {info.get('quantization') or settings.dtype}"
            f"{f', int{bits} weights' if bits else ''}, context {engine.max_model_len}, {backend} kernels)")
    return registry
