"""What a chat request constrains its answer to: a JSON object, a JSON schema, tool calls, or nothing."""

from __future__ import annotations

import json
from typing import Any

from souverain.engine.grammar import Grammar, GrammarCompiler, GrammarError
from souverain.server.errors import APIError
from souverain.server.protocol.chat import ResponseFormat
from souverain.server.tools import Function, ToolFormat, call_grammar

MAX_SCHEMA_BYTES = 256 * 1024  # a schema is compiled per request (then cached): bound the work a tenant can ask


def response_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema the answer must follow (json_object: any object), or None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    spec = fmt.json_schema
    if spec is None or not isinstance(spec.json_schema, dict):
        raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON schema object)",
                       param="response_format.json_schema.schema")
    return spec.json_schema


def build(compiler: GrammarCompiler, schema: dict[str, Any] | None, fmt: ToolFormat, functions: list[Function],
          tool_mode: str, parallel: bool) -> Grammar | None:
    """Compile (or find in the cache) the request's grammar. Blocking: call it from a worker thread."""
    calls = tool_mode != "none" and bool(functions)
    if schema is None and not calls:
        return None
    _check_size(schema, "response_format")
    for f in functions:
        _check_size(f.parameters, "tools")
    if not calls:
        try:
            return compiler.json_schema(schema or {})
        except GrammarError as e:
            raise APIError(400, f"response_format: {e}", param="response_format", code="unsupported_schema") from None
    for i, f in enumerate(functions):  # each schema on its own first, so an error names its function
        try:
            compiler.json_schema(f.parameters)
        except GrammarError as e:
            raise APIError(400, f"tools[{i}] ({f.name}) parameters: {e}", param="tools",
                           code="unsupported_schema") from None
    try:
        return compiler.lark(call_grammar(fmt, functions, tool_mode, parallel, answer_schema=schema))
    except GrammarError as e:
        raise APIError(400, f"tools: {e}", param="tools", code="unsupported_schema") from None


def _check_size(schema: dict[str, Any] | None, param: str) -> None:
    if schema is not None and len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise APIError(400, f"{param}: schema larger than {MAX_SCHEMA_BYTES // 1024} KiB", param=param)
