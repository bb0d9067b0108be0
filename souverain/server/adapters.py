"""Fine-tuned models appear in the registry as soon as their job succeeds (or an adapter is imported)."""

from __future__ import annotations

import json
from pathlib import Path

from souverain.db import finetune
from souverain.db.database import Database
from souverain.engine.adapters import AdapterCache
from souverain.model.lora import LoraWeights
from souverain.server.registry import Registry
from souverain.train.adapter import AdapterError, load_adapter


def sync_adapters(registry: Registry, db: Database | None, data_dir: Path) -> None:
    """Register succeeded jobs' adapters and imported ones whose base model is served."""
    found: list[tuple[str, str, Path, str | None, int | None]] = []
    if db is not None:
        with db.session() as s:
            for job in finetune.succeeded(s):
                assert job.fine_tuned_model is not None
                found.append((job.fine_tuned_model, job.model, data_dir / "adapters" / job.id, job.id,
                              int(job.modified_at.timestamp())))
    folder = data_dir / "adapters"
    if folder.is_dir():
        for info_path in folder.glob("*/adapter.json"):
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                continue
            if info.get("imported_from") and info.get("id"):
                found.append((str(info["id"]), str(info.get("base")), info_path.parent, None, None))
    for model_id, parent, path, job_id, created in found:
        if model_id not in registry.adapters and parent in registry.models and path.is_dir():
            registry.add_adapter(model_id, parent, path, job_id, created)


def adapter_cache(registry: Registry, base_id: str, capacity: int = 8) -> AdapterCache:
    """The engine's adapter loader for `base_id`: reads the folder the registry knows for a fine-tuned id."""

    def load(name: str) -> LoraWeights:
        folder = registry.adapter_dirs.get(name)
        base = registry.models.get(base_id)
        if folder is None or base is None:
            raise ValueError(f"unknown adapter {name!r}")
        try:
            return load_adapter(folder, base.engine.engine.args)
        except AdapterError as e:
            raise ValueError(str(e)) from None

    return AdapterCache(load, capacity)
