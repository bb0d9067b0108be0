"""Server settings: pydantic at the edge, filled from options and SOUVERAIN_* variables by the CLI."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    models: list[str] = Field(default_factory=lambda: ["smollm2", "minilm"])
    api_keys: list[str] = Field(default_factory=list)  # static keys; none = no authentication
    kv_cache_memory: int = 1 << 30
    max_waiting: int = 256
    max_body_bytes: int = 16 << 20  # larger requests get 413
    dtype: str = "bfloat16"
    bits: str = "auto"
