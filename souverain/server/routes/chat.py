"""POST /v1/chat/completions (Mistral and OpenAI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from souverain.engine.request import Request
from souverain.server.deps import CurrentKey, Models, find_model
from souverain.server.errors import APIError, error_body
from souverain.server.generation import (
    api_finish,
    check_capacity,
    collect,
    logprobs_json,
    new_id,
    now,
    sampling_params,
    sse,
    stream_engine,
    usage,
)
from souverain.server.protocol.chat import ChatCompletionRequest, FIMCompletionRequest, Sampling
from souverain.server.registry import LoadedModel
from souverain.tokenizer.chat import ChatTemplateError

router = APIRouter()

# Mistral's documented guardrail prompt for safe_prompt=true.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")


def prompt_ids(model: LoadedModel, req: ChatCompletionRequest) -> list[int]:
    messages: list[dict[str, Any]] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                      for m in req.messages]
    if req.safe_prompt:
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{SAFE_PROMPT}\n\n{messages[0]['content']}"
        else:
            messages.insert(0, {"role": "system", "content": SAFE_PROMPT})
    prefix = None
    if req.messages[-1].prefix:
        if req.messages[-1].role != "assistant":
            raise APIError(400, "only a final assistant message can have prefix: true", param="messages")
        prefix = messages.pop()["content"]
    tok = model.tokenizer
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    if prefix:  # the answer continues the given start
        ids += tok.encode(prefix, add_special=False, parse_special=False)
    return ids


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, _: CurrentKey, models: Models) -> Any:
    """Create a chat completion; `stream: true` sends server-sent events ending in `data: [DONE]`."""
    model = find_model(models, req.model)
    kind = req.response_format.type if req.response_format else "text"
    if kind == "json_schema":
        raise APIError(400, "response_format json_schema is not supported yet; json_object is",
                       param="response_format")
    return await respond(model, req, prompt_ids(model, req), (req.top_logprobs or 0) if req.logprobs else None,
                         json_object=kind == "json_object")


@router.post("/v1/fim/completions", response_model=None)
async def fim_completions(req: FIMCompletionRequest, _: CurrentKey, models: Models) -> Any:
    """Fill in the middle: the code between `prompt` and `suffix`, for models with FIM tokens."""
    model = find_model(models, req.model)
    if "fim" not in model.info.get("capabilities", []):
        raise APIError(400, f"model {req.model!r} has no fill-in-the-middle capability", param="model")
    try:
        ids = model.tokenizer.encode_fim(req.prompt, req.suffix or "")
    except ValueError as e:
        raise APIError(400, str(e), param="model") from None
    return await respond(model, req, ids, None)


async def respond(model: LoadedModel, req: Sampling, ids: list[int], logprobs: int | None,
                  json_object: bool = False) -> Any:
    """Run `ids` through the engine; answer as a chat completion, whole or streamed."""
    request = Request(new_id("cmpl"), ids, sampling_params(req, model, len(ids), logprobs, json_object))
    check_capacity(model, request)
    if req.stream:
        return StreamingResponse(_stream(model, req, request), media_type="text/event-stream")
    choices, prompt_tokens = await collect(model, request)
    completion = sum(c.completion_tokens for c in choices)
    return {
        "id": request.request_id, "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text), "tool_calls": None},
                     "finish_reason": c.finish_reason,
                     "logprobs": logprobs_json(model.tokenizer, c.logprobs) if logprobs is not None else None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion),
    }


async def _stream(model: LoadedModel, req: Sampling, request: Request) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "chat.completion.chunk", "created": now(), "model": req.model}
    prompt_tokens = len(request.prompt_ids)
    completion = 0
    want_logprobs = request.params.logprobs is not None
    try:
        for i in range(request.params.n):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None, "logprobs": None}]})
        async for d in stream_engine(model, request):
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            chunk: dict[str, Any] = {**base, "choices": [{
                "index": d.index, "delta": {"content": d.text},
                "finish_reason": api_finish(d.finish_reason) if d.finish_reason else None,
                "logprobs": logprobs_json(model.tokenizer, d.logprobs) if want_logprobs and d.logprobs else None}]}
            if d.finish_reason is not None:
                completion += d.completion_tokens
                # Mistral reports usage on the final chunk.
                chunk["usage"] = usage(prompt_tokens, d.completion_tokens)
            yield sse(chunk)
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion)})
    except APIError as e:  # headers are gone: report in the stream
        yield sse(error_body(e.message, e.type, e.param, e.code))
    yield sse("[DONE]")
