"""From a chat request's messages to the token ids of the model's own prompt (tools included)."""

from __future__ import annotations

import json
from typing import Any

from souverain.server.errors import APIError
from souverain.server.protocol.chat import ChatCompletionRequest, Message
from souverain.server.tools import GENERIC_INSTRUCTION, Function, ToolFormat, mistral_id
from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.chat import ChatTemplateError

# Mistral's documented guardrail prompt for safe_prompt=true.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")
TEXT_PARTS = ("text",)


# Message fields that carry something the model would otherwise never see: refused by name, not dropped.
UNREAD_FIELDS = ("images", "audio", "function_call", "files")


def message_text(m: Message, index: int, model: str) -> str:
    """A message's text. Parts the model cannot read (images, audio, documents) are refused by name."""
    for name in UNREAD_FIELDS:
        if (m.model_extra or {}).get(name):
            raise APIError(400, f"messages[{index}].{name} is not supported by {model!r}",
                           param=f"messages[{index}].{name}", code="unsupported_content")
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise APIError(400, f"messages[{index}].content[{j}]: {kind!r} parts are not supported by {model!r}, "
                                f"a text-only model", param=f"messages[{index}].content[{j}].type",
                           code="unsupported_content")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _arguments(call: dict[str, Any], where: str) -> tuple[str, str]:
    fn = call.get("function") or {}
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str):
        raise APIError(400, f"{where}: a tool call needs function.name", param="messages")
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _history(req: ChatCompletionRequest, fmt: ToolFormat, model: str) -> list[dict[str, Any]]:
    """The conversation in the shape the model's template (or mistral-common) reads."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, for tool results that do not say it
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        text = message_text(m, i, model)
        if role == "assistant" and m.tool_calls:
            calls = [(c.get("id") or f"call{i}x{j}", *_arguments(c, f"messages[{i}].tool_calls[{j}]"))
                     for j, c in enumerate(m.tool_calls)]
            names.update({cid: name for cid, name, _ in calls})
            if fmt.kind == "generic":
                blocks = "\n".join(f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'
                                   for _, name, args in calls)
                out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
            else:
                cid = mistral_id if fmt.kind == "mistral" else str
                out.append({"role": "assistant", "content": text or None, "tool_calls": [
                    {"id": cid(c), "type": "function", "function": {"name": n, "arguments": _loads(a)}}
                    for c, n, a in calls]})
            continue
        if role == "tool":
            name = m.name or names.get(m.tool_call_id or "", "")
            if fmt.kind == "generic":
                block = f"<tool_response>\n{json.dumps({'name': name, 'content': text}, ensure_ascii=False)}\n" \
                        f"</tool_response>"
                if out and out[-1].get("tool_results"):  # results of one turn's calls go together
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "tool_results": True})
                continue
            out.append({"role": "tool", "content": text, "name": name,
                        "tool_call_id": mistral_id(m.tool_call_id or name) if fmt.kind == "mistral"
                        else m.tool_call_id})
            continue
        out.append({"role": role, "content": text})
    for msg in out:
        msg.pop("tool_results", None)
    return out


def _loads(args: str) -> Any:
    # Templates (and mistral-common) write arguments themselves: give them the object when it parses.
    try:
        return json.loads(args)
    except ValueError:
        return args


def prompt_ids(tok: Tokenizer, req: ChatCompletionRequest, fmt: ToolFormat, functions: list[Function],
               tool_mode: str) -> tuple[list[int], str]:
    """The prompt's token ids, and the text of a final `prefix: true` assistant message ("" if none): the
    answer continues it. The tools are shown to the model unless tool_choice is none."""
    messages = _history(req, fmt, req.model)
    shown = functions if tool_mode != "none" else []
    system = [SAFE_PROMPT] if req.safe_prompt else []
    if shown and not fmt.template_takes_tools:
        system.append(GENERIC_INSTRUCTION.format(tools="\n".join(json.dumps(f.spec(), ensure_ascii=False)
                                                                  for f in shown)))
    if system:
        if messages[0]["role"] == "system":
            messages[0]["content"] = "\n\n".join([*system, messages[0]["content"]])
        else:
            messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    prefix = None
    if req.messages[-1].prefix:
        if req.messages[-1].role != "assistant":
            raise APIError(400, "only a final assistant message can have prefix: true", param="messages")
        prefix = messages.pop()["content"]
    tools = [f.spec() for f in shown] if shown and fmt.template_takes_tools else None
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    if prefix:  # the answer continues the given start
        ids += tok.encode(prefix, add_special=False, parse_special=False)
    return ids, prefix or ""
