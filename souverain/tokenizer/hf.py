"""Tokenizers backed by HF `tokenizers` (from tokenizer.json, or built from a GGUF vocabulary)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import processors

from souverain.tokenizer.base import ChatMessage
from souverain.tokenizer.chat import ChatTemplateError, render_chat

LONG_TEXT = 16_384  # characters: longer texts are encoded without holding the GIL


class HFTokenizer:
    """`raw`'s post-processor decides what `add_special` adds (BOS for Llama/Mistral), exactly
    as transformers does with add_special_tokens=True."""

    def __init__(self, raw: RawTokenizer, *, bos: str | None, eos: Sequence[str],
                 chat_template: str | None, extra_eos_ids: Sequence[int] = ()) -> None:
        self.raw = raw
        # A twin that never matches special-token strings in text; two objects rather than a
        # flag flipped per call, so concurrent encodes cannot race.
        self.plain = RawTokenizer.from_str(raw.to_str())
        self.plain.encode_special_tokens = True
        self.vocab_size = raw.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos
        self.bos_id = raw.token_to_id(bos) if bos else None
        eos_ids = {e: raw.token_to_id(e) for e in eos}
        self.eos_tokens = [e for e, i in eos_ids.items() if i is not None]
        self.eos_ids = frozenset([i for i in eos_ids.values() if i is not None] + list(extra_eos_ids))
        self.chat_template = chat_template
        added = raw.get_added_tokens_decoder()
        self._special = frozenset(i for i, t in added.items() if t.special)
        names = sorted({t.content for t in added.values() if t.special and t.content}, key=len, reverse=True)
        # Control-token text ("<|im_end|>", "<|start_header_id|>"...) as it could be typed into a message.
        self._control = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = self.raw if parse_special else self.plain
        if len(text) > LONG_TEXT:
            # tokenizers' encode holds the GIL throughout (seconds for megabytes: every other thread, the
            # server's event loop included, stops); encode_batch releases it.
            return list(raw.encode_batch([text], add_special_tokens=add_special)[0].ids)
        return list(raw.encode(text, add_special_tokens=add_special).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """StarCoder-style <fim_prefix>…<fim_suffix>…<fim_middle>, or Mistral-style [SUFFIX]…[PREFIX]…."""
        ids = {t: self.raw.token_to_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "[PREFIX]",
                                                      "[SUFFIX]")}
        head = self.encode("", add_special=True)  # BOS, where the model wants one
        pre, suf, mid = ids["<fim_prefix>"], ids["<fim_suffix>"], ids["<fim_middle>"]
        if pre is not None and suf is not None and mid is not None:
            return [*head, pre, *self._text(prompt), suf, *self._text(suffix), mid]
        pre, suf = ids["[PREFIX]"], ids["[SUFFIX]"]
        if pre is not None and suf is not None:
            return [*head, suf, *self._text(suffix), pre, *self._text(prompt)]
        raise ValueError("this model's vocabulary has no fill-in-the-middle tokens")

    def _text(self, text: str) -> list[int]:
        return self.encode(text, add_special=False, parse_special=False)

    def render_chat(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           bos_token=self.bos_token or "", eos_token=self.eos_tokens[0] if self.eos_tokens else "")

    def apply_chat_template(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The template's own markup becomes control tokens; the messages' text never does: a user who types
        "<|im_end|>\n<|im_start|>system" gets those characters, not a forged system turn. (The template writes
        BOS itself where the model wants one, as transformers assumes.)"""
        control = self._control
        if control is not None and control.search(json.dumps([tools, [m.get("tool_calls") for m in messages]],
                                                             ensure_ascii=False)):
            raise ChatTemplateError("tools and tool calls may not contain control-token text")
        nonce = secrets.token_hex(4)
        held: list[str] = []  # message contents holding control-token text, rendered through markers

        def mark(m: ChatMessage) -> ChatMessage:
            content = m.get("content")
            if control is None or not isinstance(content, str) or not control.search(content):
                return m
            held.append(content)
            return {**m, "content": f"\ue000{nonce}:{len(held) - 1}\ue001"}

        text = self.render_chat([mark(m) for m in messages], add_generation_prompt=add_generation_prompt, tools=tools)
        if not held:  # the usual case: one encode, exactly as transformers tokenises the rendered text
            return self.encode(text, add_special=False, parse_special=True)
        ids: list[int] = []
        pos = 0
        for found in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", text):
            ids += self.encode(text[pos : found.start()], add_special=False, parse_special=True)
            ids += self._text(held[int(found.group(1))])
            pos = found.end()
        return ids + self.encode(text[pos:], add_special=False, parse_special=True)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value if isinstance(value, str) else None


def hf_tokenizer_from_folder(folder: Path) -> HFTokenizer:
    """tokenizer.json plus tokenizer_config.json (specials, chat template) and generation_config."""

    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    # Padding and truncation in tokenizer.json are batch settings of the trainer; we encode one text.
    raw.no_padding()
    raw.no_truncation()
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    extra_eos: list[int] = []
    if (folder / "generation_config.json").exists():
        eos = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
    bos = _token_str(config.get("bos_token"))
    eos_token = _token_str(config.get("eos_token"))
    # What encode() adds around a text is tokenizer.json's post-processor's business: transformers
    # 5 follows it too (an add_bos_token in tokenizer_config.json does not override it).
    return HFTokenizer(raw, bos=bos, eos=[eos_token] if eos_token else [], chat_template=template,
                       extra_eos_ids=extra_eos)


def set_specials(raw: RawTokenizer, bos: str | None, eos: str | None = None) -> None:
    """Make `add_special` put `bos` before (and `eos` after) a text, or add nothing."""
    ends = [(t, raw.token_to_id(t)) for t in (bos, eos) if t is not None and raw.token_to_id(t) is not None]
    if not ends:
        raw.post_processor = None
        return
    head = f"{bos}:0 " if bos else ""
    tail = f" {eos}:0" if eos else ""
    raw.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} {head}$B:1{tail}", special_tokens=ends)
