"""The protocol every tokenizer implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

ChatMessage = dict[str, Any]  # {"role": ..., "content": ...} as the OpenAI/Mistral APIs send it


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_ids: frozenset[int]

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. `add_special` adds what the model expects around a text (BOS);
        `parse_special` lets special-token strings in the text become their ids (chat templates
        need that; untrusted user text should not have it)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...

    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The model's own chat format, as token ids ready for generation."""
        ...

    def is_special(self, token_id: int) -> bool: ...

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """Fill-in-the-middle prompt ids; ValueError when the vocabulary has no FIM tokens."""
        ...
