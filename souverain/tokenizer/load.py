"""Find and build the right tokenizer for a model path."""

from __future__ import annotations

from pathlib import Path

from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.gguf_vocab import gguf_tokenizer
from souverain.tokenizer.hf import hf_tokenizer_from_folder


class TokenizerError(ValueError):
    pass


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model: a `.gguf` file (its embedded vocabulary), a model folder (Mistral
    layout -> mistral-common; HF layout -> tokenizer.json), or a Mistral tokenizer file itself."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from souverain.weights.gguf_file import GGUFFile

            return gguf_tokenizer(GGUFFile(path).metadata)
        from souverain.tokenizer.mistral import MistralTokenizer

        return MistralTokenizer(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or folder")
    # mistral-common is imported only when a Mistral tokenizer is actually needed.
    from souverain.tokenizer.mistral import MistralTokenizer, find_mistral_tokenizer

    mistral_file = find_mistral_tokenizer(path)
    # Mistral layout is read with Mistral's tokenizer; an HF folder with its own tokenizer.json
    # uses that, as transformers would.
    if mistral_file and ((path / "params.json").exists() or not (path / "tokenizer.json").exists()):
        return MistralTokenizer(mistral_file)
    if (path / "tokenizer.json").exists():
        return hf_tokenizer_from_folder(path)
    raise TokenizerError(f"{path}: no tokenizer.json, tekken.json or tokenizer.model.* found")
