from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from souverain.db.database import Database
from souverain.server.registry import Registry
from tests.server.platform_app import FakeClock, serve, tiny_registry
from tests.server.smollm2_app import serve_smollm2


@pytest.fixture(scope="package")
def server(smollm2_path: Path, minilm_path: Path) -> Iterator[str]:
    """SmolLM2 (and a tiny Mistral-tokenizer model) behind the real app on loopback, shared by the API tests."""
    yield from serve_smollm2(smollm2_path, minilm_path)


# -- the platform tests: tiny models behind the real app with a platform database (SQLite and PostgreSQL) ----
@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """Tiny engines, one set per test module (their caches outlive each test: use prompts new to them)."""
    reg = tiny_registry()
    yield reg
    reg.shutdown()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def url(registry: Registry, db: Database, clock: FakeClock) -> Iterator[str]:
    with serve(registry, db, clock) as u:
        yield u
