"""Streaming detokenisation that never emits half a character.

Decoding token by token breaks when a character spans tokens (byte-level BPE splits emoji and
CJK into bytes) and when a tokenizer's decode depends on neighbours (SentencePiece's leading
space). So we decode a small window: the text of ids[prefix:read] was already emitted; the new
text is decode(ids[prefix:]) minus it, held back while it ends in U+FFFD (an incomplete
character) or adds nothing.
"""

from __future__ import annotations

from souverain.tokenizer.base import Tokenizer

# Earlier tokens kept as decoding context (SentencePiece spaces, multi-byte characters).
_CONTEXT = 5


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True,
                 prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = list(prompt_ids or [])[-_CONTEXT:]
        self.prefix = 0
        self.read = len(self.ids)

    def _texts(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special
        return decode(self.ids[self.prefix : self.read], skip_special=skip), decode(
            self.ids[self.prefix :], skip_special=skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "" while a character is split)."""
        self.ids.append(token_id)
        done, text = self._texts()
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # keep the window small: drop what no decode will read again
            self.ids = self.ids[self.prefix :]
            self.read -= self.prefix
            self.prefix = 0
        return text[len(done):]

    def flush(self) -> str:
        """What is still held back at the end of a stream (e.g. a truncated character)."""
        done, text = self._texts()
        self.prefix = self.read = len(self.ids)
        return text[len(done):] if len(text) > len(done) else ""
