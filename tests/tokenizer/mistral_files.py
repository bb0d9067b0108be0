"""Mistral's tokenizer files, as the mistral-common package ships them."""

from __future__ import annotations

from pathlib import Path

import mistral_common

DATA = Path(mistral_common.__file__).parent / "data"
MISTRAL_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240911.json",
}


def mistral_file(version: str) -> Path:
    return DATA / MISTRAL_FILES[version]


def v11_tekken(folder: Path) -> Path:
    """A tekken v11 file (the function-calling format of Mistral Small 3.x, Magistral, Devstral) made from the
    shipped v3 one: mistral-common ships none, and real ones come with weights that cannot be downloaded here.
    Same vocabulary; the version and an explicit special-token list with [ARGS] and [CALL_ID]."""
    import json

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(mistral_file("tekken").read_text(encoding="utf-8"))
    data["config"]["version"] = "v11"
    specials = [{"rank": t["rank"], "token_str": str(getattr(t["token_str"], "value", t["token_str"])),
                 "is_control": True} for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    named = {32: "[ARGS]", 33: "[CALL_ID]"}
    data["special_tokens"] = [*specials, *({"rank": i, "token_str": named.get(i, f"<SPECIAL_{i}>"), "is_control": True}
                                           for i in range(len(specials), 1000))]
    path = folder / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def spm_gguf_metadata(path: Path) -> dict[str, object]:
    """The tokenizer metadata llama.cpp's converter writes for a SentencePiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True}
