"""LoRA adapters for the engine: loaded on first use, kept while used, evicted least-recently-used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from souverain.model.lora import LoraWeights


class AdapterCache:
    def __init__(self, load: Callable[[str], LoraWeights], capacity: int = 8) -> None:
        self._load = load
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, LoraWeights] = OrderedDict()
        self.loads = 0

    def get(self, name: str) -> LoraWeights:
        """The adapter `name`, loading it (and evicting the least recently used) when absent."""
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        adapter = self._load(name)
        self.loads += 1
        self._items[name] = adapter
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return adapter

    def __contains__(self, name: str) -> bool:
        return name in self._items
