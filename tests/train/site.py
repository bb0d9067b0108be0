"""A server over the tiny Llama with fine-tuning enabled, for the job tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from souverain.db.database import Database
from souverain.server.app import create_app
from souverain.server.loader import load_models
from souverain.server.settings import Settings
from tests.serving import running


@contextmanager
def jobs_site(db: Database, tmp_path: Path, model: Path, root_key: str) -> Iterator[dict[str, Any]]:
    """{"url", "db", "registry", "settings"} of a server on `db` whose uploads and jobs live under tmp_path."""
    settings = Settings(models=[f"tiny={model}"], api_keys=[root_key], kv_cache_memory=8 << 20, dtype="float32",
                        data_dir=str(tmp_path / "data"))
    registry = load_models(settings, say=lambda m: None)
    try:
        with running(lambda port: create_app(settings, registry, db)) as url:
            yield {"url": url, "db": db, "registry": registry, "settings": settings}
    finally:
        registry.shutdown()
