"""What a model is, read from its own files: architecture, size, quantisation, context, template."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from souverain.weights.gguf_file import GGUFFile


def describe(path: Path) -> dict[str, Any]:
    """Facts for `show`/`list`, without loading any weights."""
    if path.is_file():
        return _gguf(path)
    if (path / "params.json").exists():
        return _mistral(path)
    if (path / "config.json").exists():
        return _hf(path)
    return {"format": "unknown"}


def _gguf(path: Path) -> dict[str, Any]:
    g = GGUFFile(path)
    arch = g.field("general.architecture")
    types = Counter(t.type.name for t in g.tensors if len(t.shape) >= 2)
    params = sum(_count(t.shape) for t in g.tensors)
    return {
        "format": "gguf",
        "architecture": arch,
        "parameters": params,
        "quantization": types.most_common(1)[0][0] if types else None,
        "context_length": g.field(f"{arch}.context_length"),
        "license": g.field("general.license"),
        "chat_template": g.field("tokenizer.chat_template"),
        "capabilities": _caps(g.field("tokenizer.chat_template") is not None, _fim(g.field("tokenizer.ggml.tokens"))),
    }


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fim(tokens: list[str] | None) -> bool:
    return bool(tokens) and any(t in ("[SUFFIX]", "<fim_suffix>") for t in tokens or [])


def _caps(chat: bool, fim: bool, embeddings: bool = False) -> list[str]:
    return [c for c, on in (("chat", chat), ("fim", fim), ("embeddings", embeddings)) if on] or ["completion"]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _hf(path: Path) -> dict[str, Any]:
    config = _read(path / "config.json")
    tok = _read(path / "tokenizer_config.json")
    template = tok.get("chat_template") if isinstance(tok.get("chat_template"), str) else None
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    embeddings = (path / "modules.json").exists() or (path / "config_sentence_transformers.json").exists()
    # A sentence-transformers model reads at most its max_seq_length tokens (the server's embedder does the same).
    context = _read(path / "sentence_bert_config.json").get("max_seq_length") if embeddings else None
    return {
        "format": "sentence-transformers" if embeddings else "hf",
        "architecture": config.get("model_type"),
        "quantization": str(config.get("torch_dtype") or config.get("dtype") or "") or None,
        "context_length": context or config.get("max_position_embeddings"),
        "chat_template": template,
        "capabilities": _caps(template is not None and not embeddings, False, embeddings),
    }


def _mistral(path: Path) -> dict[str, Any]:
    params = _read(path / "params.json")
    has_tok = any(path.glob("tekken.json")) or any(path.glob("tokenizer.model*"))
    return {
        "format": "mistral",
        "architecture": "mixtral" if params.get("moe") else "mistral",
        "quantization": None,
        "context_length": params.get("max_seq_len") or params.get("max_position_embeddings"),
        "chat_template": "mistral-common instruct format" if has_tok else None,
        "capabilities": _caps(has_tok, False),
    }
