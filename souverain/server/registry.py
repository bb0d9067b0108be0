"""The models a server has loaded, each with its engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.tokenizer.base import Tokenizer


@dataclass
class LoadedModel:
    id: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    info: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_context(self) -> int:
        return self.engine.engine.max_model_len


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

    def add(self, model: LoadedModel) -> None:
        self.models[model.id] = model

    def add_embedder(self, embedder: LoadedEmbedder) -> None:
        self.embedders[embedder.id] = embedder

    def get(self, model_id: str) -> LoadedModel | None:
        return self.models.get(model_id)

    def shutdown(self) -> None:
        for m in self.models.values():
            m.engine.shutdown()
