"""POST /v1/completions (OpenAI's legacy text completions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from souverain.engine.request import Request, TokenLogprob
from souverain.server.defaults import with_defaults
from souverain.server.deps import CurrentCaller, Models, PlatformDep, find_model
from souverain.server.errors import APIError, error_body
from souverain.server.generation import (
    GONE,
    api_finish,
    client_gone,
    collect,
    metered,
    now,
    refuse_oversized,
    refuse_unsupported,
    sse,
    start,
    token_text,
    usage,
)
from souverain.server.metering import Meter
from souverain.server.platform import Platform
from souverain.server.protocol.chat import CompletionRequest
from souverain.server.registry import LoadedModel
from souverain.tokenizer.base import Tokenizer

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, caller: CurrentCaller, models: Models, plat: PlatformDep,
                      http: HTTPRequest) -> Any:
    """Continue a raw text prompt (no chat template)."""
    model = find_model(models, req.model, caller, plat)
    req = with_defaults(req, model)
    if not isinstance(req.prompt, str):
        if len(req.prompt) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        req.prompt = req.prompt[0]
    if req.suffix:
        raise APIError(400, "suffix needs a model with fill-in-the-middle support; use /v1/fim/completions",
                       param="suffix")
    refuse_unsupported(req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs needs the prompt's log-probabilities, which this server does not "
                            "compute", param="echo")
    adm = plat.gate(caller, model.id)  # rate limits before the prompt is tokenised
    refuse_oversized(len(req.prompt.encode()), model, adm)
    ids = await run_in_threadpool(model.tokenizer.encode, req.prompt)
    if not ids:
        raise APIError(400, "prompt is empty (and this model adds no BOS token)", param="prompt")
    request, meter = start(plat, caller, model, req, ids, req.logprobs, "completions", adm)
    headers = adm.headers
    if req.stream:
        return StreamingResponse(_stream(plat, model, req, request, meter), media_type="text/event-stream",
                                 headers=headers)
    choices = await collect(plat, model, request, meter, client_gone(http.receive))
    if choices is None:
        return GONE
    prompt_tokens = len(ids)
    completion = sum(c.completion_tokens for c in choices)
    echo = req.prompt if req.echo else ""
    return JSONResponse({
        "id": request.request_id, "object": "text_completion", "created": now(), "model": req.model,
        "choices": [{"index": i, "text": echo + "".join(c.text), "finish_reason": c.finish_reason,
                     "logprobs": legacy_logprobs(model.tokenizer, c.logprobs, len(echo))
                     if req.logprobs is not None else None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, completion),
    }, headers=headers)


def legacy_logprobs(tok: Tokenizer, items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape: parallel lists of tokens, their log-probabilities, the top alternatives (as
    token -> logprob, the chosen one included) and each token's character offset in the text."""
    def piece(i: int) -> str:
        return token_text(tok, i)

    tokens = [piece(lp.token_id) for lp in items]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{piece(lp.token_id): lp.logprob, **{piece(t): v for t, v in lp.top}} for lp in items],
            "text_offset": offsets}


async def _stream(plat: Platform, model: LoadedModel, req: CompletionRequest, request: Request, meter: Meter
                  ) -> AsyncIterator[str]:
    base = {"id": request.request_id, "object": "text_completion", "created": now(), "model": req.model}
    prompt_tokens, completion = len(request.prompt_ids), 0
    offsets = [0] * request.params.n  # each choice's text so far, for text_offset
    try:
        async with aclosing(metered(plat, model, request, meter)) as deltas:
            async for d in deltas:
                if d.text or d.finish_reason or d.logprobs:
                    lp = legacy_logprobs(model.tokenizer, d.logprobs or [], offsets[d.index]) \
                        if req.logprobs is not None else None
                    offsets[d.index] += len(d.text)
                    yield sse({**base, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                                    "finish_reason": api_finish(d.finish_reason) if d.finish_reason
                                                    else None}]})
                if d.finish_reason is not None:
                    completion += d.completion_tokens
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion)})
    except APIError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
    yield sse("[DONE]")
