"""Fine-tuning data in Mistral's JSONL formats: validated line by line, then tokenised with a loss mask.

- instruct: {"messages": [...]} with user/assistant (and system, tool) turns; an assistant message may carry
  "weight": 0 to be shown but not learned.
- pretraining: {"text": "..."}: every token is learned.
- function calling: "tools" beside the messages, assistant "tool_calls" (rendered by the chat template).
Loss falls on the assistant's tokens only (or on all of a text sample).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from souverain.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
MAX_ERRORS = 20


@dataclass
class Validation:
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "line N: what is wrong"
    kind: str = "instruct"  # instruct | pretrain

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.samples)


def _check_messages(msgs: Any) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return '"messages" must be a non-empty list'
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        return "no assistant message to learn from"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}"
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and m.get("tool_calls")):
            return f"messages[{i}].content must be a string"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"messages[{i}].weight must be 0 or 1"
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            return f"messages[{i}].tool_calls must be a list"
    if msgs[-1].get("role") != "assistant":
        return "the last message must be the assistant's"
    return None


def validate_jsonl(raw: bytes) -> Validation:
    """Every line parsed and checked; errors name their line (1-based). All lines must share one format."""
    out = Validation()
    kinds: set[str] = set()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        out.errors.append(f"the file is not UTF-8 (byte {e.start})")
        return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(out.errors) >= MAX_ERRORS:
            out.errors.append("... (more errors not shown)")
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.errors.append(f"line {n}: not JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            out.errors.append(f"line {n}: a sample must be a JSON object")
            continue
        if "text" in obj and "messages" not in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                out.errors.append(f'line {n}: "text" must be a non-empty string')
                continue
            kinds.add("pretrain")
        elif "messages" in obj:
            problem = _check_messages(obj["messages"])
            if problem:
                out.errors.append(f"line {n}: {problem}")
                continue
            if "tools" in obj and not isinstance(obj["tools"], list):
                out.errors.append(f'line {n}: "tools" must be a list')
                continue
            kinds.add("instruct")
        else:
            out.errors.append(f'line {n}: a sample needs "messages" (instruct) or "text" (pretraining)')
            continue
        out.samples.append(obj)
    if len(kinds) > 1:
        out.errors.append("the file mixes instruct and pretraining samples; use one format per file")
    if not out.samples and not out.errors:
        out.errors.append("the file holds no samples")
    out.kind = kinds.pop() if len(kinds) == 1 else "instruct"
    return out


@dataclass(frozen=True)
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the next-token loss counts (the token at that position is a target)


def tokenize(sample: dict[str, Any], tok: Tokenizer) -> Example:
    """Token ids and which of them are learned: the assistant turns (weight 1), or a whole text."""
    if "text" in sample:
        text_ids = [*tok.encode(sample["text"]), *sorted(tok.eos_ids)[:1]]  # learn to end, too
        return Example(text_ids, [0] + [1] * (len(text_ids) - 1))
    msgs = sample["messages"]
    tools = sample.get("tools")
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tools=tools) if i else []
        through = tok.apply_chat_template(msgs[: i + 1], add_generation_prompt=False, tools=tools)
        if before[: len(ids)] != ids or through[: len(before)] != before:
            # A template that rewrites earlier turns: learn this turn from a fresh render.
            ids, mask = before[:], [0] * len(before)
        else:
            mask += [0] * (len(before) - len(ids))
            ids = before[:]
        learn = 0 if m.get("weight", 1) == 0 else 1
        mask += [learn] * (len(through) - len(ids))
        ids = through[:]
    return Example(ids, mask)


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into sequences of at most `seq_len` (longer ones are cut); fewer pad tokens."""
    out: list[Example] = []
    ids: list[int] = []
    mask: list[int] = []
    for ex in examples:
        e_ids, e_mask = ex.ids[:seq_len], ex.mask[:seq_len]
        if ids and len(ids) + len(e_ids) > seq_len:
            out.append(Example(ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        out.append(Example(ids, mask))
    return out
