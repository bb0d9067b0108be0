"""POST /v1/chat/completions (Mistral and OpenAI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from souverain.engine.request import Request
from souverain.server.deps import CurrentCaller, Models, PlatformDep, find_model
from souverain.server.errors import APIError, error_body
from souverain.server.generation import Meter, api_finish, collect, logprobs_json, now, sse, start, stream_engine, usage
from souverain.server.platform import Caller, Platform
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
async def chat_completions(req: ChatCompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep
                           ) -> Any:
    """Create a chat completion; `stream: true` sends server-sent events ending in `data: [DONE]`."""
    model = find_model(models, req.model, caller, plat)
    kind = req.response_format.type if req.response_format else "text"
    if kind == "json_schema":
        raise APIError(400, "response_format json_schema is not supported yet; json_object is",
                       param="response_format")
    return await respond(plat, caller, model, req, prompt_ids(model, req),
                         (req.top_logprobs or 0) if req.logprobs else None, "chat", json_object=kind == "json_object")


@router.post("/v1/fim/completions", response_model=None)
async def fim_completions(req: FIMCompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep
                          ) -> Any:
    """Fill in the middle: the code between `prompt` and `suffix`, for models with FIM tokens."""
    model = find_model(models, req.model, caller, plat)
    if "fim" not in model.info.get("capabilities", []):
        raise APIError(400, f"model {req.model!r} has no fill-in-the-middle capability", param="model")
    try:
        ids = model.tokenizer.encode_fim(req.prompt, req.suffix or "")
    except ValueError as e:
        raise APIError(400, str(e), param="model") from None
    return await respond(plat, caller, model, req, ids, None, "fim")


async def respond(plat: Platform, caller: Caller, model: LoadedModel, req: Sampling, ids: list[int],
                  logprobs: int | None, endpoint: str, json_object: bool = False) -> Any:
    """Run `ids` through the engine; answer as a chat completion, whole or streamed."""
    request, meter, headers = start(plat, caller, model, req, ids, logprobs, endpoint, json_object)
    if req.stream:
        return StreamingResponse(_stream(model, req, request, meter), media_type="text/event-stream", headers=headers)
    choices, prompt_tokens = await collect(model, request, meter)
    completion = sum(c.completion_tokens for c in choices)
    return JSONResponse({
        "id": request.request_id, "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text), "tool_calls": None},
                     "finish_reason": c.finish_reason,
                     "logprobs": logprobs_json(model.tokenizer, c.logprobs) if logprobs is not None else None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion),
    }, headers=headers)


async def _stream(model: LoadedModel, req: Sampling, request: Request, meter: Meter) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "chat.completion.chunk", "created": now(), "model": req.model}
    prompt_tokens = len(request.prompt_ids)
    completion = 0
    want_logprobs = request.params.logprobs is not None
    try:
        for i in range(request.params.n):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None, "logprobs": None}]})
        async for d in stream_engine(model, request):
            meter.add(d)
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
        await meter.close()  # committed before the stream ends
    except APIError as e:  # headers are gone: report in the stream
        await meter.close("error")
        yield sse(error_body(e.message, e.type, e.param, e.code))
    finally:
        if not meter.recorded:  # the client went away: what was generated is still billed
            await meter.close("cancelled")
    yield sse("[DONE]")
