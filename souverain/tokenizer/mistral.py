"""Mistral's own tokenizers (SentencePiece v1-v7, tekken) through mistral-common."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer
from pydantic import ValidationError

from souverain.tokenizer.base import ChatMessage
from souverain.tokenizer.chat import ChatTemplateError

# The files mistral-common knows: tekken.json, tokenizer.model.v1/v3/v7..., and older names.
MISTRAL_FILES = ("tekken.json", "tokenizer.model.v*", "mistral_instruct_tokenizer_*", "tokenizer.model")


class MistralTokenizer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mistral = MistralCommonTokenizer.from_file(str(path))
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.vocab_size = self.raw.n_words
        self.bos_id: int | None = self.raw.bos_id
        self.eos_ids = frozenset([self.raw.eos_id])
        self._special = frozenset(self.raw.special_ids) if hasattr(self.raw, "special_ids") else frozenset()

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        # mistral-common never turns text into control tokens, whatever parse_special says:
        # "[INST]" typed by a user stays plain text, which is what a chat server wants.
        return list(self.raw.encode(text, bos=add_special, eos=False))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        return str(self.raw.decode(list(ids), special_token_policy=policy))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def special_id(self, name: str) -> int | None:
        """The id of a control token such as "[TOOL_CALLS]", or None when this version has none."""
        try:
            found = int(self.raw.get_special_token(name))
        except (MistralCommonException, ValueError, KeyError, AttributeError):
            return None
        # SentencePiece answers an unknown name with <unk>'s id: only an id that spells the name is it.
        return found if self.decode([found], skip_special=False) == name else None

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes as the model emits them (what a grammar engine matches against); control
        tokens as 0xFF + their name, the convention llguidance reads as "special"."""
        model = getattr(self.raw, "_model", None)  # SentencePiece's processor (v1-v7); Tekken's is tiktoken's
        if not hasattr(model, "is_control"):
            model = None
        out: list[bytes] = []
        for i in range(self.vocab_size):
            if i in self._special or (model is not None and (model.is_control(i) or model.is_unknown(i))):
                name = model.id_to_piece(i) if model is not None else self.decode([i], skip_special=False)
                out.append(b"\xff" + str(name).encode())
            elif model is None:
                out.append(bytes(self.raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)))  # type: ignore[attr-defined]
            elif model.is_byte(i):
                out.append(bytes([int(model.id_to_piece(i)[3:5], 16)]))  # "<0x41>"
            else:
                out.append(model.id_to_piece(i).replace("\u2581", " ").encode())
        return out

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """Mistral's FIM format ([SUFFIX]…[PREFIX]…) as mistral-common builds it."""
        from mistral_common.protocol.fim.request import FIMRequest

        try:
            return list(self.mistral.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens)
        except Exception as e:
            raise ValueError(f"this tokenizer cannot encode fill-in-the-middle: {e}") from None

    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Mistral's instruct format, as mistral-common builds it (a final assistant message is
        continued when add_generation_prompt is False)."""
        request: dict[str, Any] = {"messages": list(messages)}
        if tools:
            request["tools"] = list(tools)
        if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
            request["continue_final_message"] = True
        try:
            return list(self.mistral.encode_chat_completion(ChatCompletionRequest(**request)).tokens)
        except (MistralCommonException, ValidationError, ValueError, TypeError) as e:
            # mistral-common validates the conversation (who speaks first, tool call ids...).
            raise ChatTemplateError(f"invalid conversation for this model: {e}") from None


def find_mistral_tokenizer(folder: Path) -> Path | None:
    for pattern in MISTRAL_FILES:
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]  # the newest version when several are shipped
    return None
