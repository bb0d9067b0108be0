"""POST /v1/completions (OpenAI's legacy text completions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from souverain.engine.request import Request
from souverain.server.deps import CurrentCaller, Models, PlatformDep, find_model
from souverain.server.errors import APIError, error_body
from souverain.server.generation import Meter, api_finish, collect, now, sse, start, stream_engine, usage
from souverain.server.protocol.chat import CompletionRequest
from souverain.server.registry import LoadedModel

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep) -> Any:
    """Continue a raw text prompt (no chat template)."""
    model = find_model(models, req.model, caller, plat)
    if not isinstance(req.prompt, str):
        if len(req.prompt) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        req.prompt = req.prompt[0]
    if req.suffix:
        raise APIError(400, "suffix needs a model with fill-in-the-middle support; use /v1/fim/completions",
                       param="suffix")
    ids = model.tokenizer.encode(req.prompt)
    request, meter, headers = start(plat, caller, model, req, ids, None, "completions")
    if req.stream:
        return StreamingResponse(_stream(model, req, request, meter), media_type="text/event-stream", headers=headers)
    choices, prompt_tokens = await collect(model, request, meter)
    completion = sum(c.completion_tokens for c in choices)
    echo = req.prompt if req.echo else ""
    return JSONResponse({
        "id": request.request_id, "object": "text_completion", "created": now(), "model": req.model,
        "choices": [{"index": i, "text": echo + "".join(c.text), "finish_reason": c.finish_reason, "logprobs": None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion),
    }, headers=headers)


async def _stream(model: LoadedModel, req: CompletionRequest, request: Request, meter: Meter) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "text_completion", "created": now(), "model": req.model}
    try:
        async for d in stream_engine(model, request):
            meter.add(d)
            if d.text or d.finish_reason:
                yield sse({**base, "choices": [{"index": d.index, "text": d.text, "logprobs": None,
                                                "finish_reason": api_finish(d.finish_reason) if d.finish_reason
                                                else None}]})
        await meter.close()
    except APIError as e:
        await meter.close("error")
        yield sse(error_body(e.message, e.type, e.param, e.code))
    finally:
        if not meter.recorded:
            await meter.close("cancelled")
    yield sse("[DONE]")
