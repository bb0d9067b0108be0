"""From a validated request to engine Requests, and from engine Deltas to API responses."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Message

from souverain.engine.grammar import Grammar
from souverain.engine.request import Delta, EngineOverloaded, FinishReason, Request, SamplingParams, TokenLogprob
from souverain.server.errors import APIError, error_body
from souverain.server.metering import Meter
from souverain.server.platform import Admission, Caller, Platform
from souverain.server.protocol.chat import Sampling, unsupported
from souverain.server.registry import LoadedModel
from souverain.tokenizer.base import Tokenizer

DEFAULT_TEMPERATURE = 0.7  # Mistral's API default


def sampling_params(req: Sampling, model: LoadedModel, prompt_len: int, logprobs: int | None,
                    plan_context: int | None = None) -> SamplingParams:
    context = min(model.max_context, plan_context or model.max_context)
    room = context - prompt_len
    asked = req.max_tokens or req.max_completion_tokens
    if room < 1 or (asked is not None and asked > room):
        # Never truncate silently: say both numbers.
        whose = "the model's" if context == model.max_context else "your plan's"
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked or 1}) exceeds {whose} context of "
                            f"{context} tokens", param="max_tokens" if room >= 1 else "messages",
                       code="context_length_exceeded")
    if asked is None and req._default_max_tokens is not None:  # the model's default, not the caller's: fitted
        asked = min(req._default_max_tokens, max(room, 1))
    seed = req.random_seed if req.random_seed is not None else req.seed
    bias = _logit_bias(req.logit_bias, model.engine.engine.args.vocab_size)
    try:
        return SamplingParams(
            max_tokens=min(asked or room, room),
            min_tokens=min(req.min_tokens or 0, asked or room, room),
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=tuple(req.stop or ()),  # type: ignore[arg-type]
            seed=seed,
            n=req.n,
            logprobs=logprobs,
            logit_bias=bias,
        )
    except ValueError as e:
        field_name = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=field_name) from None


MAX_BYTES_PER_TOKEN = 256  # no vocabulary we know has a longer token: a prompt this long cannot fit


def refuse_oversized(text_bytes: int, model: LoadedModel, adm: Admission) -> None:
    """400 before tokenising a prompt that cannot fit the context whatever its tokens (tokenising megabytes
    costs seconds of CPU): estimated from its size in bytes."""
    context = min(model.max_context, adm.max_context or model.max_context)
    if text_bytes > context * MAX_BYTES_PER_TOKEN:
        raise APIError(400, f"prompt ({text_bytes} bytes, at least {text_bytes // MAX_BYTES_PER_TOKEN} tokens) "
                            f"exceeds the context of {context} tokens", param="messages",
                       code="context_length_exceeded")


def refuse_unsupported(req: Sampling) -> None:
    """Nothing silently ignored: a parameter this server cannot honour is a 400 naming it."""
    name = unsupported(req)
    if name is not None:
        raise APIError(400, f"parameter {name!r} is not supported by this server", param=name,
                       code="unsupported_parameter")


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        # ASCII digits only: "²" is a digit to str.isdigit() and not to int().
        if not (key.isascii() and key.isdigit()) or not int(key) < vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})",
                           param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def start(platform: Platform, caller: Caller, model: LoadedModel, req: Sampling, ids: list[int],
          logprobs: int | None, endpoint: str, adm: Admission, grammar: Grammar | None = None
          ) -> tuple[Request, Meter]:
    """The engine request and its meter, after the gate (`adm`): the organisation's running + queued allowance,
    then `n x max_tokens` reserved from the token buckets (the unused part is given back at the end); the
    usage row opens now. Refused before any byte is sent."""
    try:
        params = sampling_params(req, model, len(ids), logprobs, adm.max_context)
    except APIError:
        platform.charge(caller, len(ids))  # refused after tokenising: that work counts against the rate limit
        raise
    request = Request(new_id("cmpl"), ids, params, priority=adm.priority, cache_salt=adm.cache_salt,
                      adapter=model.adapter, grammar=grammar, tenant=adm.tenant, tenant_max_running=adm.max_running)
    check_capacity(model, request)
    release = platform.hold(caller, params.n)
    reserved = params.n * params.max_tokens
    platform.charge(caller, len(ids) + reserved)

    def on_close(produced: int) -> None:
        platform.charge(caller, produced - reserved)
        release()

    meter = Meter(platform.ledger_for(caller), caller.usage(request.request_id, req.model, endpoint, len(ids), 0, 0,
                                                             "running"), lambda: request.produced, on_close)
    if meter.ledger is not None:
        meter.ledger.open(meter)
    return request, meter


def settle_later(platform: Platform, model: LoadedModel, request: Request, meter: Meter, status: str) -> None:
    """The client went away: once the engine has ended the request (within a step), bill what it generated.
    A task of its own, since the caller is being cancelled."""
    async def settle() -> None:
        await model.engine.finished(request.request_id)
        await meter.close(status)

    platform.background(settle())


def check_capacity(model: LoadedModel, request: Request) -> None:
    """Refuse with 503 before any response starts when the engine's queue is full."""
    try:
        model.engine.check_capacity(request.params.n)
    except EngineOverloaded as e:
        raise APIError(429, f"the server is busy ({e}); retry shortly", type_="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None


async def stream_engine(model: LoadedModel, request: Request) -> AsyncIterator[Delta]:
    try:
        async for delta in model.engine.generate(request):
            if delta.finish_reason is FinishReason.ERROR:
                raise APIError(500, f"generation failed: {delta.error}", type_="server_error")
            yield delta
    except EngineOverloaded as e:
        raise APIError(429, f"the server is busy ({e}); retry shortly", type_="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except RuntimeError as e:
        raise APIError(500, str(e), type_="server_error") from None


async def metered(platform: Platform, model: LoadedModel, request: Request, meter: Meter
                  ) -> AsyncGenerator[Delta, None]:
    """The engine's deltas for a stream, each committed to the meter before it is yielded (write-ahead). The
    meter is closed however this ends: finished, failed (APIError re-raised), or closed early by a client
    that went away (the request is cancelled and what it generated is billed). Use with `aclosing`."""
    meter.begun = True
    try:
        async for d in stream_engine(model, request):
            meter.add(len(d.token_ids), d.finish_reason.value if d.finish_reason else None)
            await meter.covered()
            yield d
        await meter.close()
    except APIError:
        await model.engine.finished(request.request_id)
        await meter.close("error")
        raise
    finally:
        if not meter.closed:
            settle_later(platform, model, request, meter, "cancelled")


async def collect(platform: Platform, model: LoadedModel, request: Request, meter: Meter,
                  disconnected: Callable[[], Awaitable[None]]) -> list[Choice] | None:
    """The whole answer, its usage committed before this returns; None when the client went away first
    (the request is cancelled at once and what it generated is billed)."""
    choices = [Choice() for _ in range(request.params.n)]
    meter.begun = True

    async def consume() -> None:
        async for d in stream_engine(model, request):
            meter.add(len(d.token_ids), d.finish_reason.value if d.finish_reason else None)
            c = choices[d.index]
            c.text.append(d.text)
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs or []
            if d.finish_reason is not None:
                c.finish_reason = api_finish(d.finish_reason)
                c.completion_tokens = d.completion_tokens

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled
        work.cancel()
        gone.cancel()
        settle_later(platform, model, request, meter, "cancelled")
        raise
    gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        settle_later(platform, model, request, meter, "cancelled")
        return None
    if work.exception() is not None:
        await model.engine.finished(request.request_id)
        await meter.close("error")
        work.result()  # raises
    await meter.close()
    return choices


def client_gone(receive: Callable[[], Awaitable[Message]]) -> Callable[[], Awaitable[None]]:
    """Resolves when the client disconnects (the body has been read: the next message is the disconnect)."""
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


GONE = JSONResponse(error_body("client closed the request", "invalid_request_error", code="client_closed"), 499)


def api_finish(reason: FinishReason) -> str:
    return reason.value if reason is not FinishReason.CANCELLED else "stop"


def token_text(tok: Tokenizer, token_id: int) -> str:
    """One token's text as the logprobs fields show it (control tokens included)."""
    return tok.decode([token_id], skip_special=False)


def logprobs_json(tok: Tokenizer, items: list[TokenLogprob]) -> dict[str, Any]:
    def piece(i: int) -> str:
        return token_text(tok, i)

    # OpenAI's fields, plus Mistral's token_id (the mistralai SDK drops entries without it).
    return {"content": [{
        "token": piece(lp.token_id), "token_id": lp.token_id, "logprob": lp.logprob,
        "bytes": list(piece(lp.token_id).encode()),
        "top_logprobs": [{"token": piece(t), "token_id": t, "logprob": v, "bytes": list(piece(t).encode())}
                         for t, v in lp.top],
    } for lp in items]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
