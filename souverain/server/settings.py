"""Server settings: pydantic at the edge, filled from options and SOUVERAIN_* variables by the CLI."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    models: list[str] = Field(default_factory=lambda: ["smollm2", "minilm"])
    api_keys: list[str] = Field(default_factory=list)  # static keys; none = no authentication
    metrics_keys: list[str] = Field(default_factory=list)  # keys that may read /metrics and nothing else
    kv_cache_memory: int = 1 << 30
    max_waiting: int = 256
    max_body_bytes: int = 16 << 20  # larger requests get 413
    dtype: str = "bfloat16"
    bits: str = "auto"
    max_file_bytes: int = 256 << 20  # uploads to /v1/files
    usage_stale_seconds: float = Field(60.0, ge=0)  # a running usage row untouched this long: its server died
    data_dir: str | None = None  # files, jobs and adapters; default: the model store's folder

    def data_path(self) -> Path:
        from souverain.hub.store import default_home

        return Path(self.data_dir) if self.data_dir else default_home()
