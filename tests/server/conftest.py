from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.smollm2_app import serve_smollm2


@pytest.fixture(scope="package")
def server(smollm2_path: Path, minilm_path: Path) -> Iterator[str]:
    """SmolLM2 (and a tiny Mistral-tokenizer model) behind the real app on loopback, shared by the API tests."""
    yield from serve_smollm2(smollm2_path, minilm_path)
