"""Function calling: each model's native tool-call format, its prompt, and the grammar its calls follow.

Three formats, chosen from the model's own files (never from its name):
- `mistral`: tokenizers whose vocabulary has `[TOOL_CALLS]` (v3 and later). mistral-common writes the
  tools as `[AVAILABLE_TOOLS]` and past results as `[TOOL_RESULTS]`; the model answers
  `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or from v11 (vocabularies with `[ARGS]`)
  `[TOOL_CALLS]name[ARGS]{...}`, once per call.
- `hermes`: chat templates that take `tools` and write `<tool_call>` (Qwen 2/2.5/3, Hermes, SmolLM3...):
  the template renders tools, calls and results; the model answers `<tool_call>{...}</tool_call>` blocks.
- `llama3`: chat templates that take `tools` and ask for `{"name": ..., "parameters": ...}` (Llama 3.1-3.3):
  the template renders tools and results (`ipython`); the model answers one such JSON object.
- `generic`: every other chat model (SmolLM2 among them). The tools go into the system message with the
  instruction below (documented in the README), and the answer uses the same `<tool_call>` blocks.

In every format a call is the JSON object `{"name": ..., "arguments": {...}}` (`parameters` for llama3) and its
arguments are
grammar-constrained to the function's `parameters` schema; with tool_choice `auto` the grammar allows
plain text or calls, with `required`/`any` or a named function only calls, with `none` no grammar at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from souverain.engine.grammar import WHITESPACE
from souverain.server.errors import APIError
from souverain.tokenizer.base import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128  # OpenAI's limit too
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

GENERIC_INSTRUCTION = (
    "You can call the following tools. Each line is one tool, with the JSON schema of its arguments:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with only this, one block per call:\n"
    "<tool_call>\n{{\"name\": \"<tool name>\", \"arguments\": {{<arguments as JSON>}}}}\n</tool_call>\n"
    "The results come back in <tool_response> blocks. If no tool is needed, answer normally.")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolFormat:
    kind: str  # mistral | hermes | llama3 | generic
    call_token: int | None = None  # [TOOL_CALLS], for mistral
    args_token: int | None = None  # [ARGS], for mistral v11 and later

    @property
    def template_takes_tools(self) -> bool:
        return self.kind in ("mistral", "hermes", "llama3")

    @property
    def args_key(self) -> str:
        return "parameters" if self.kind == "llama3" else "arguments"

    @property
    def mistral_ids(self) -> bool:
        """Mistral's prompts carry 9-character call ids; others get OpenAI's call_ form."""
        return self.kind == "mistral"


def tool_format(tok: Tokenizer) -> ToolFormat:
    """The model's native format, read from its tokenizer and chat template."""
    special_id = getattr(tok, "special_id", None)
    if special_id is not None:  # mistral-common
        call = special_id("[TOOL_CALLS]")
        return ToolFormat("mistral", call, special_id("[ARGS]")) if call is not None else ToolFormat("generic")
    template = getattr(tok, "chat_template", None) or ""
    if "tools" in template and OPEN in template:
        return ToolFormat("hermes")
    if "tools" in template and '"parameters": dictionary of argument name' in template:
        return ToolFormat("llama3")
    return ToolFormat("generic")


def parse_tools(tools: list[dict[str, Any]] | None) -> list[Function]:
    """OpenAI's and Mistral's `tools` (both `{"type": "function", "function": {...}}`), checked."""
    if tools and len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools: at most {MAX_TOOLS} functions, got {len(tools)}", param="tools")
    out: list[Function] = []
    for i, tool in enumerate(tools or []):
        if tool.get("type", "function") != "function":
            raise APIError(400, f"tools[{i}]: only function tools are supported, got type {tool.get('type')!r}",
                           param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise APIError(400, f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -", param="tools")
        params = fn.get("parameters") if fn.get("parameters") is not None else {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append(Function(fn["name"], str(fn.get("description") or ""), params))
    if len({f.name for f in out}) != len(out):
        raise APIError(400, "tools: function names must be unique", param="tools")
    return out


def choose(functions: list[Function], tool_choice: Any) -> tuple[str, list[Function]]:
    """(mode, callable functions): mode is none, auto or required (`any` is Mistral's name for it)."""
    if tool_choice is None:
        return ("auto" if functions else "none"), functions
    if isinstance(tool_choice, str):
        mode = {"none": "none", "auto": "auto", "any": "required", "required": "required"}.get(tool_choice)
        if mode is None:
            raise APIError(400, f"tool_choice must be none, auto, any, required or a function, got {tool_choice!r}",
                           param="tool_choice")
        if mode != "none" and not functions:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return mode, functions
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [f for f in functions if f.name == name]
    if not chosen:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return "required", chosen


def call_grammar(fmt: ToolFormat, functions: list[Function], mode: str, parallel: bool,
                 answer_schema: dict[str, Any] | None = None) -> str:
    """The Lark grammar (llguidance's dialect) of an answer: calls only, or text (a JSON document when
    `answer_schema` is given) or calls."""
    calls = [f"call_{i}" for i in range(len(functions))]
    key = json.dumps(json.dumps(fmt.args_key))
    rules = [f'{c}: "{{" WS "\\"name\\"" WS ":" WS {json.dumps(json.dumps(f.name))} WS "," WS {key} '
             f'WS ":" WS args_{i} WS "}}"\nargs_{i}: %json {json.dumps(_with_whitespace(f.parameters))}'
             for i, (c, f) in enumerate(zip(calls, functions, strict=True))]
    one = " | ".join(calls)
    if fmt.kind == "mistral" and fmt.args_token is not None:  # v11: [TOOL_CALLS]name[ARGS]{...} per call
        rules = [f"{c}: <[{fmt.call_token}]> {json.dumps(f.name)} <[{fmt.args_token}]> args_{i}\n"
                 f"args_{i}: %json {json.dumps(_with_whitespace(f.parameters))}"
                 for i, (c, f) in enumerate(zip(calls, functions, strict=True))]
        body = "one+" if parallel else "one"
        text = "TEXT: /(?s:.+)/"
    elif fmt.kind == "mistral":
        items = 'one ("," WS one)*' if parallel else "one"
        body = f'<[{fmt.call_token}]> WS "[" WS {items} WS "]"'
        text = "TEXT: /(?s:.+)/"  # plain text never holds the [TOOL_CALLS] control token
    elif fmt.kind == "llama3":
        body = "WS one"  # Llama 3's templates take one call per turn
        text = "TEXT: /(?s:.+)/ & ~/(?s:[\\x20\\n\\t]*\\{.*)/"
    else:
        block = f'"{OPEN}" NL one NL "{CLOSE}"'
        body = f"{block} (NL {block})*" if parallel else block
        # Text that does not open with a call block: the two alternatives never overlap.
        text = f"TEXT: /(?s:.+)/ & ~/(?s:[\\x20\\n\\t]*{re.escape(OPEN)}.*)/"
    answer = "answer: TEXT"
    if answer_schema is not None:
        answer = f"answer: %json {json.dumps(_with_whitespace(answer_schema))}"
    start = "start: calls" if mode == "required" else "start: answer | calls"
    return "\n".join([start, answer, f"calls: {body}", f"one: {one}", *rules, f"WS: /{WHITESPACE}/", r'NL: /\n?/',
                      text])


def _with_whitespace(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {"whitespace_pattern": WHITESPACE, "whitespace_flexible": False}}


def call_id(fmt: ToolFormat, seed: str, index: int) -> str:
    """Mistral's 9-character ids for Mistral models, OpenAI's call_ ids otherwise; unique per answer."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()
    if fmt.mistral_ids:
        return _base62(int(digest, 16))[:9]
    return "call_" + digest[:24]


def _base62(n: int) -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 62)
        out += alphabet[r]
    return out.rjust(9, "0")


def mistral_id(any_id: str) -> str:
    """A history's call id as mistral-common wants it (9 letters or digits); others are mapped stably."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", any_id):
        return any_id
    return _base62(int(hashlib.sha256(any_id.encode()).hexdigest(), 16))[:9]
