"""Server settings: pydantic at the edge, filled from options, SOUVERAIN_* variables and `--config` by the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: str | int) -> int:
    """Bytes from `1073741824`, `2GiB`, `512 MiB`, `1.5G`, `800MB` (K/M/G/T are powers of 1000, KiB/MiB/... of 1024)."""
    if isinstance(value, int):
        return value
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = found.group(2).lower() if found else None
    if found is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size: write bytes, or a number with KB, MB, GB, KiB, MiB, GiB, ...")
    return int(float(found.group(1)) * _UNITS[unit])


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    models: list[str] = Field(default_factory=lambda: ["smollm2", "minilm"])
    api_keys: list[str] = Field(default_factory=list)  # static keys; none = no authentication
    metrics_keys: list[str] = Field(default_factory=list)  # keys that may read /metrics and nothing else
    kv_cache_memory: int = Field(1 << 30, ge=1)  # bytes for each model's KV block pool
    max_model_len: int | None = Field(None, ge=16)  # default: each model's context, capped by its pool
    max_num_seqs: int = Field(64, ge=1)  # sequences decoded together
    max_num_batched_tokens: int = Field(1024, ge=16)  # tokens per engine step (prompt chunks + decodes)
    kv_values: Literal["auto", "int8", "bf16"] = "auto"  # what generated tokens attend to: EngineConfig.int8_values
    chat_template: str | None = None  # a Jinja template (its text) replacing the first chat model's own
    served_model_names: list[str] = Field(default_factory=list)  # the first chat model's id, then its aliases
    max_waiting: int = 256
    max_body_bytes: int = 16 << 20  # larger requests get 413
    dtype: str = "bfloat16"
    bits: str = "auto"
    max_file_bytes: int = 256 << 20  # uploads to /v1/files
    usage_stale_seconds: float = Field(60.0, ge=0)  # a running usage row untouched this long: its server died
    data_dir: str | None = None  # files, jobs and adapters; default: the model store's folder
    allowed_origins: list[str] = Field(default_factory=list)  # CORS: none by default (same-origin only)
    root_path: str = ""  # the prefix a reverse proxy serves us under (it strips it before forwarding)
    keep_alive: float | None = Field(None, ge=0)  # seconds an idle model stays loaded; None: for ever
    max_loaded_models: int | None = Field(None, ge=1)  # LRU cap; None: every served model may stay loaded
    access_log: bool = True
    log_format: Literal["text", "json"] = "text"

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, v: str | int) -> int:
        return parse_size(v)

    def data_path(self) -> Path:
        from souverain.hub.store import default_home

        return Path(self.data_dir) if self.data_dir else default_home()
