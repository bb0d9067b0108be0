"""POST /v1/chat/completions (Mistral and OpenAI) and POST /v1/fim/completions."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from souverain.engine.grammar import Grammar
from souverain.engine.request import Request
from souverain.server import constraints
from souverain.server.defaults import with_defaults
from souverain.server.deps import CurrentCaller, Models, PlatformDep, find_model
from souverain.server.errors import APIError, error_body
from souverain.server.generation import (
    GONE,
    Choice,
    api_finish,
    client_gone,
    collect,
    logprobs_json,
    metered,
    now,
    refuse_oversized,
    refuse_unsupported,
    sse,
    start,
    usage,
)
from souverain.server.metering import Meter
from souverain.server.platform import Admission, Caller, Platform
from souverain.server.prompt import prompt_ids
from souverain.server.protocol.chat import ChatCompletionRequest, FIMCompletionRequest, Sampling
from souverain.server.registry import LoadedModel
from souverain.server.tool_stream import CallArguments, CallStart, Content, Event, ToolCallReader
from souverain.server.tools import ToolFormat, call_id, choose, parse_tools, tool_format

router = APIRouter()


@dataclass
class ChatPlan:
    """What a chat request asks beyond sampling: its grammar and how to read tool calls from the answer."""

    grammar: Grammar | None
    reader: ToolCallReader | None  # None: no tools were offered (or tool_choice is none)
    fmt: ToolFormat
    # Mistral's `prefix: true`: its API returns the prefix followed by what the model added to it.
    prefix: str = ""


def _plan(model: LoadedModel, req: ChatCompletionRequest) -> tuple[list[int], ChatPlan]:
    """Prompt ids and constraints. Template rendering, tokenising and grammar compiling block: the route
    runs this in a worker thread."""
    fmt = tool_format(model.tokenizer)
    functions = parse_tools(req.tools)
    mode, callable_ = choose(functions, req.tool_choice)
    ids, prefix = prompt_ids(model.tokenizer, req, fmt, functions, mode)
    schema = constraints.response_schema(req.response_format)
    if prefix and (schema is not None or (mode != "none" and functions)):
        raise APIError(400, "prefix: true cannot be combined with response_format or tools", param="messages")
    grammar = constraints.build(model.grammars, schema, fmt, callable_, mode, req.parallel_tool_calls is not False)
    reader = ToolCallReader(fmt) if mode != "none" and functions else None
    return ids, ChatPlan(grammar, reader, fmt, prefix)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep,
                           http: HTTPRequest) -> Any:
    """Create a chat completion; `stream: true` sends server-sent events ending in `data: [DONE]`. `tools` (with
    `tool_choice` and `parallel_tool_calls`) lets the model call functions; `response_format` json_object or
    json_schema constrains the answer to JSON. Both are enforced by grammar-constrained decoding."""
    model = find_model(models, req.model, caller, plat)
    req = with_defaults(req, model)
    refuse_unsupported(req)
    adm = plat.gate(caller, model.id)  # rate limits before the prompt is rendered and tokenised
    refuse_oversized(sum(len(m.model_dump_json(exclude_none=True)) for m in req.messages), model, adm)
    ids, plan = await run_in_threadpool(_plan, model, req)
    return await respond(plat, caller, model, req, ids, (req.top_logprobs or 0) if req.logprobs else None, "chat",
                         adm, client_gone(http.receive), plan)


@router.post("/v1/fim/completions", response_model=None)
async def fim_completions(req: FIMCompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep,
                          http: HTTPRequest) -> Any:
    """Fill in the middle: the code between `prompt` and `suffix`, for models with FIM tokens."""
    model = find_model(models, req.model, caller, plat)
    req = with_defaults(req, model)
    refuse_unsupported(req)
    if "fim" not in model.info.get("capabilities", []):
        raise APIError(400, f"model {req.model!r} has no fill-in-the-middle capability", param="model")
    adm = plat.gate(caller, model.id)
    refuse_oversized(len(req.prompt.encode()) + len((req.suffix or "").encode()), model, adm)
    try:
        ids = await run_in_threadpool(model.tokenizer.encode_fim, req.prompt, req.suffix or "")
    except ValueError as e:
        raise APIError(400, str(e), param="model") from None
    return await respond(plat, caller, model, req, ids, None, "fim", adm, client_gone(http.receive))


async def respond(plat: Platform, caller: Caller, model: LoadedModel, req: Sampling, ids: list[int],
                  logprobs: int | None, endpoint: str, adm: Admission, disconnected: Callable[[], Awaitable[None]],
                  plan: ChatPlan | None = None) -> Any:
    """Run `ids` through the engine; answer as a chat completion, whole or streamed."""
    request, meter = start(plat, caller, model, req, ids, logprobs, endpoint, adm, plan.grammar if plan else None)
    headers = adm.headers
    if req.stream:
        return StreamingResponse(_stream(plat, model, req, request, meter, plan), media_type="text/event-stream",
                                 headers=headers)
    choices = await collect(plat, model, request, meter, disconnected)
    if choices is None:
        return GONE
    prompt_tokens = len(ids)
    completion = sum(c.completion_tokens for c in choices)
    return JSONResponse({
        "id": request.request_id, "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": i, **_message(request.request_id, i, c, plan),
                     "logprobs": logprobs_json(model.tokenizer, c.logprobs) if logprobs is not None else None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion),
    }, headers=headers)


def _message(request_id: str, index: int, c: Choice, plan: ChatPlan | None) -> dict[str, Any]:
    """The assistant message of one finished choice: its text, or the tool calls read from it."""
    text = (plan.prefix if plan else "") + "".join(c.text)
    if plan is None or plan.reader is None:
        return {"message": {"role": "assistant", "content": text, "tool_calls": None}, "finish_reason": c.finish_reason}
    reader = dataclasses.replace(plan.reader)
    events = reader.feed(text, c.token_ids) + reader.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, CallStart):
            calls.append({"id": call_id(plan.fmt, f"{request_id}:{index}", e.index), "type": "function",
                          "function": {"name": e.name, "arguments": ""}})
        elif isinstance(e, CallArguments):
            calls[e.index]["function"]["arguments"] += e.text
    finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    return {"message": {"role": "assistant", "content": content or (None if calls else ""),
                        "tool_calls": calls or None}, "finish_reason": finish}


def _tool_delta(fmt: ToolFormat, request_id: str, index: int, e: Event) -> dict[str, Any]:
    """One reader event as a chunk's delta. A call opens with its index, id and name (arguments ""), then
    its arguments follow in pieces. Pieces carry `name: ""`: Mistral's SDK requires a name in every tool
    call it parses, and OpenAI's SDK concatenates names, where "" adds nothing."""
    if isinstance(e, Content):
        return {"content": e.text}
    if isinstance(e, CallStart):
        return {"tool_calls": [{"index": e.index, "id": call_id(fmt, f"{request_id}:{index}", e.index),
                                "type": "function", "function": {"name": e.name, "arguments": ""}}]}
    assert isinstance(e, CallArguments)
    return {"tool_calls": [{"index": e.index, "function": {"name": "", "arguments": e.text}}]}


async def _stream(plat: Platform, model: LoadedModel, req: Sampling, request: Request, meter: Meter,
                  plan: ChatPlan | None) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "chat.completion.chunk", "created": now(), "model": req.model}
    prompt_tokens = len(request.prompt_ids)
    completion = 0
    want_logprobs = request.params.logprobs is not None
    n = request.params.n
    readers = [dataclasses.replace(plan.reader) if plan and plan.reader else None for _ in range(n)]
    called = [False] * n
    try:
        for i in range(n):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": plan.prefix if plan
                                                                  else ""},
                                            "finish_reason": None, "logprobs": None}]})
        async with aclosing(metered(plat, model, request, meter)) as engine_deltas:
            async for d in engine_deltas:
                reader = readers[d.index]
                if reader is None or plan is None:
                    deltas = [{"content": d.text}] if d.text else []
                else:
                    events = reader.feed(d.text, d.token_ids) + (reader.finish() if d.finish_reason else [])
                    deltas = [_tool_delta(plan.fmt, request.request_id, d.index, e) for e in events]
                    called[d.index] |= any(isinstance(e, CallStart) for e in events)
                lp = logprobs_json(model.tokenizer, d.logprobs) if want_logprobs and d.logprobs else None
                if (d.finish_reason is not None or lp) and not deltas:
                    deltas = [{"content": ""}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    finish = api_finish(d.finish_reason) if last and d.finish_reason else None
                    if finish == "stop" and called[d.index]:
                        finish = "tool_calls"
                    chunk: dict[str, Any] = {**base, "choices": [{"index": d.index, "delta": delta,
                                                                  "finish_reason": finish,
                                                                  "logprobs": lp if last else None}]}
                    if last and d.finish_reason is not None:
                        completion += d.completion_tokens
                        chunk["usage"] = usage(prompt_tokens, d.completion_tokens)  # Mistral: on the last chunk
                    yield sse(chunk)
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion)})
    except APIError as e:  # headers are gone: report in the stream (the meter is closed)
        yield sse(error_body(e.message, e.type, e.param, e.code))
    yield sse("[DONE]")
