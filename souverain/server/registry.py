"""The models a server has loaded, each with its engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.grammar import GrammarCompiler
from souverain.server.residency import Residency
from souverain.tokenizer.base import Tokenizer


@dataclass
class LoadedModel:
    id: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    info: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    path: Path | None = None  # the weights (fine-tuning reads them); None for models built in memory
    adapter: str | None = None  # a fine-tuned id runs on its parent's engine with this adapter
    parent: str | None = None
    job: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # its Modelfile's system, parameters, messages

    _grammars: GrammarCompiler | None = field(default=None, repr=False)

    @property
    def max_context(self) -> int:
        """The engine's context, or less where a Modelfile's num_ctx says so (a variant sharing an engine)."""
        cap = self.defaults.get("parameters", {}).get("context")
        return min(self.engine.engine.max_model_len, cap) if cap else self.engine.engine.max_model_len

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles this model's grammars (JSON schemas, tool calls); built on first use."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.engine.engine.args.vocab_size)
        return self._grammars


@dataclass
class LoadedEmbedder:
    id: str
    embedder: Embedder
    info: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Registry:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    embedders: dict[str, LoadedEmbedder] = field(default_factory=dict)
    adapters: dict[str, LoadedModel] = field(default_factory=dict)  # fine-tuned ids
    adapter_dirs: dict[str, Path] = field(default_factory=dict)
    refresh: Callable[[], None] | None = None  # looks for new fine-tuned models (set by the server)
    aliases: dict[str, str] = field(default_factory=dict)  # --served-model-name's further names -> the model's id
    residency: Residency = field(default_factory=Residency)  # keep-alive, LRU: which engines hold their weights

    def add(self, model: LoadedModel) -> None:
        self.models[model.id] = model

    def add_adapter(self, model_id: str, parent: str, folder: Path, job: str | None = None,
                    created: int | None = None) -> None:
        base = self.models[parent]
        self.adapter_dirs[model_id] = folder
        self.adapters[model_id] = LoadedModel(model_id, base.engine, base.tokenizer, base.info,
                                              created or int(time.time()), base.path, model_id, parent, job,
                                              base.defaults)

    def add_embedder(self, embedder: LoadedEmbedder) -> None:
        self.embedders[embedder.id] = embedder

    def get(self, model_id: str) -> LoadedModel | None:
        model_id = self.aliases.get(model_id, model_id)
        found = self.models.get(model_id) or self.adapters.get(model_id)
        if found is None and self.refresh is not None and model_id.startswith("ft:"):
            self.refresh()
            found = self.adapters.get(model_id)
        return found

    def shutdown(self) -> None:
        self.residency.stop()
        for m in self.models.values():
            m.engine.shutdown()
