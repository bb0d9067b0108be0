"""Load the models a server serves, each behind its own engine."""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from souverain.embed import Embedder
from souverain.engine.adapters import AdapterCache
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.hub import looks_like_path, resolve
from souverain.hub.describe import describe
from souverain.hub.sources import ADAPTER_DIR
from souverain.kernels.backend import choose
from souverain.model.quant import prepare, resolve_bits
from souverain.server.adapters import adapter_cache
from souverain.server.registry import LoadedEmbedder, LoadedModel, Registry
from souverain.server.residency import Residency, weights_size
from souverain.server.settings import Settings
from souverain.tokenizer import load_tokenizer
from souverain.tokenizer.base import Tokenizer
from souverain.weights import load_model


def freeze_heap() -> None:
    """Once the models are loaded: the imports, models and tokenizers leave ~330k long-lived objects
    (SmolLM2); a full collection walks them all (~0.2 s, more in a process holding more), stalling every
    stream mid-generation. Collect once and keep them out of later collections (vLLM does the same)."""
    gc.collect()
    gc.freeze()


def load_models(settings: Settings, say: Callable[[str], None] = print) -> Registry:
    """Each `--model` behind its own engine. The first chat model takes `--served-model-name` (its id, then
    aliases) and `--chat-template`; an installed model made by `souverain create` brings its Modelfile's
    defaults (system message, parameters, template, context)."""
    registry = Registry(residency=Residency(settings.keep_alive, settings.max_loaded_models))
    first = True
    installed: dict[str, str] = {}  # served id -> its store name
    for entry in settings.models:
        # "NAME=MODEL" serves MODEL (an installed name or a path) under the id NAME.
        name, _, ref = entry.partition("=") if "=" in entry else (entry, "", entry)
        path = resolve(ref)
        info = describe(path)
        if "embeddings" in info.get("capabilities", []):
            registry.add_embedder(LoadedEmbedder(name, Embedder(path), info))
            say(f"loaded {name} (embeddings, {info.get('architecture')})")
            continue
        defaults = installed_defaults(ref)
        template = defaults.get("template")
        if first:
            if settings.served_model_names:
                name = settings.served_model_names[0]
                registry.aliases.update({alias: name for alias in settings.served_model_names[1:]})
            template = settings.chat_template or template
        bits = resolve_bits(settings.bits, info.get("quantization"))
        tokenizer = load_tokenizer(path)
        if template is not None:
            if not hasattr(tokenizer, "chat_template"):
                raise ValueError(f"{name}: a chat template cannot replace the instruct format of a Mistral "
                                 "tokenizer (mistral-common); leave --chat-template / TEMPLATE out for this model")
            tokenizer.chat_template = template
            info = {**info, "chat_template": template, "capabilities": sorted({*info.get("capabilities", []),
                                                                                "chat"})}
        config = EngineConfig(kv_cache_memory=settings.kv_cache_memory, max_waiting=settings.max_waiting,
                              max_num_seqs=settings.max_num_seqs, max_batched_tokens=settings.max_num_batched_tokens,
                              int8_values={"auto": None, "int8": True, "bf16": False}[settings.kv_values],
                              max_model_len=settings.max_model_len or defaults.get("parameters", {}).get("context"))
        build = _builder(path, settings.dtype, bits, tokenizer, config, adapter_cache(registry, name))
        engine = build()
        backend = engine.backend
        async_engine = AsyncEngine(engine, rebuild=build)
        async_engine.start()
        registry.residency.add(name, async_engine, weights_size(path) + settings.kv_cache_memory)
        adapter = adapter_folder(ref, defaults)
        if adapter is not None:  # a Modelfile's ADAPTER: every answer of this id goes through it
            registry.adapter_dirs[name] = adapter
        registry.add(LoadedModel(name, async_engine, tokenizer, info, path=path, defaults=defaults,
                                 adapter=name if adapter is not None else None))
        if not looks_like_path(ref) and not Path(ref).expanduser().exists():
            installed[name] = ref
        first = False
        say(f"loaded {name} ({info.get('architecture')}, {info.get('quantization') or settings.dtype}"
            f"{f', int{bits} weights' if bits else ''}, context {engine.max_model_len}, {backend} kernels"
            f"{', Modelfile defaults' if defaults else ''})")
    if settings.served_model_names and first:
        raise ValueError("--served-model-name names the first chat model, and no chat model is served")
    for line in add_variants(registry, installed):
        say(line)
    for unloaded in registry.residency.trim():
        say(f"unloaded {unloaded} until its first request (--max-loaded-models {settings.max_loaded_models})")
    registry.residency.start()
    return registry


def _builder(path: Path, dtype: str, bits: int, tokenizer: Tokenizer, config: EngineConfig,
             adapters: AdapterCache) -> Callable[[], LLMEngine]:
    """Loads the weights and makes the engine: at start, and again after keep-alive or `stop` unloaded it."""

    def build() -> LLMEngine:
        model = load_model(path, dtype=getattr(torch, dtype), bits=bits)
        backend = choose(next(model.parameters()).device)
        return LLMEngine(prepare(model, backend), tokenizer, config, adapters=adapters, backend=backend)

    return build


def add_variants(registry: Registry, installed: dict[str, str]) -> list[str]:
    """Every model `souverain create` (or `cp`) made from the files of a served model is served as well, on that
    model's engine (no second copy in memory) with its own system message, parameters and template."""
    from souverain.hub.store import Store

    store = Store()

    def files_key(name: str) -> str | None:  # the weights' files (not a Modelfile ADAPTER's)
        manifest = store.get(name)
        return json.dumps(sorted((p, f["sha256"]) for p, f in manifest.files.items()
                                 if not p.startswith(f"{ADAPTER_DIR}/"))) if manifest else None

    bases = {files_key(ref): registry.models[served] for served, ref in installed.items()}
    taken = set(installed.values())
    added = []
    for manifest in store.list():
        base = bases.get(files_key(manifest.name))
        if base is None or manifest.name in taken or manifest.name in registry.models or not manifest.defaults:
            continue
        tokenizer = base.tokenizer
        if "template" in manifest.defaults and hasattr(tokenizer, "chat_template"):
            tokenizer = copy.copy(tokenizer)  # its own template; the vocabulary is shared
            tokenizer.chat_template = manifest.defaults["template"]
        elif "template" in manifest.defaults:
            added.append(f"not serving {manifest.name}: its TEMPLATE cannot replace {base.id}'s Mistral format")
            continue
        adapter = adapter_folder(manifest.name, manifest.defaults)
        if adapter is not None:  # runs on the base's engine with its adapter, as a fine-tuned model does
            registry.adapter_dirs[manifest.name] = adapter
        registry.add(LoadedModel(manifest.name, base.engine, tokenizer, base.info, path=base.path,
                                 defaults=dict(manifest.defaults), adapter=manifest.name if adapter else None,
                                 parent=base.id if adapter else None))
        added.append(f"serving {manifest.name} too (made from {base.id}'s files by `souverain create`: its engine, "
                     "its own defaults)")
    return added


def adapter_folder(name: str, defaults: dict[str, Any]) -> Path | None:
    """The converted LoRA adapter a Modelfile's ADAPTER put in an installed model's files."""
    from souverain.hub.store import Store

    return Store().files_dir(name) / defaults["adapter"] if "adapter" in defaults else None


def installed_defaults(ref: str) -> dict[str, Any]:
    """The Modelfile defaults of an installed model (none for a path, or a model installed without them)."""
    from souverain.hub.store import Store

    if looks_like_path(ref) or Path(ref).expanduser().exists():
        return {}
    manifest = Store().get(ref)
    return dict(manifest.defaults) if manifest is not None else {}
