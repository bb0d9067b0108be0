"""Build a `tokenizers` tokenizer from a GGUF vocabulary (llama.cpp's `gpt2` and `llama` models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from souverain.tokenizer.hf import HFTokenizer, set_specials

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp applies them.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFVocabError(ValueError):
    pass


def _gpt2_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Digits one by one, then GPT-2's regex (llama.cpp's regex list for these).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _bpe(tokens: Sequence[str], merges: Sequence[str], pre: str) -> RawTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [(left, right) for left, _, right in (m.partition(" ") for m in merges)]
    raw = RawTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    raw.pre_tokenizer = _gpt2_pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    return raw


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE as BPE merges: the adjacent pair whose union scores highest merges first
    (llama.cpp's and sentencepiece's rule). Splits of the same piece tie on score; SentencePiece
    merges leftmost first, so runs grow from the left: the split with the longer left part wins."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], add_space_prefix: bool,
         unk: str | None) -> RawTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _spm_merges(tokens, scores, types)
    raw = RawTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    norms: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        norms.insert(0, normalizers.Prepend("▁"))
    raw.normalizer = normalizers.Sequence(norms)
    steps: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    raw.decoder = decoders.Sequence(steps)
    return raw


def gguf_tokenizer(meta: dict[str, Any]) -> HFTokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFVocabError("no tokenizer.ggml.tokens in the GGUF metadata")
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise GGUFVocabError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    if kind == "gpt2":
        raw = _bpe(tokens, meta.get("tokenizer.ggml.merges") or [], str(meta.get("tokenizer.ggml.pre", "default")))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        raw = _spm(tokens, scores, types, add_prefix, special("unknown"))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise GGUFVocabError(f"tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    # Control tokens are special (matched whole, skipped when decoding); user-defined ones are
    # matched whole but kept in the text.
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == CONTROL])
    raw.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])
    eos = special("eos")
    set_specials(raw, special("bos") if add_bos else None,
                 eos if meta.get("tokenizer.ggml.add_eos_token") else None)
    extra = [int(i) for i in (meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
             if i is not None]
    return HFTokenizer(raw, bos=special("bos"), eos=[eos] if eos else [],
                       chat_template=meta.get("tokenizer.chat_template"), extra_eos_ids=extra)
