"""From a validated request to engine Requests, and from engine Deltas to API responses."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from souverain.engine.grammar import Grammar
from souverain.engine.request import Delta, EngineOverloaded, FinishReason, Request, SamplingParams, TokenLogprob
from souverain.server.errors import APIError
from souverain.server.platform import Caller, Platform
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
    seed = req.random_seed if req.random_seed is not None else req.seed
    bias = _logit_bias(req.logit_bias, model.engine.engine.model.args.vocab_size)
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


@dataclass
class Meter:
    """One request's usage, recorded exactly once: when it finishes, fails or its client goes away."""

    platform: Platform
    caller: Caller
    request_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0
    status: str = "stop"
    recorded: bool = False

    def add(self, d: Delta) -> None:
        if d.finish_reason is not None:
            self.completion_tokens += d.completion_tokens
            self.status = d.finish_reason.value

    async def close(self, status: str | None = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        await self.platform.record(self.caller, self.caller.usage(
            self.request_id, self.model, self.endpoint, self.prompt_tokens, self.completion_tokens,
            int((time.monotonic() - self.started) * 1000), status or self.status))


def start(platform: Platform, caller: Caller, model: LoadedModel, req: Sampling, ids: list[int],
          logprobs: int | None, endpoint: str, grammar: Grammar | None = None
          ) -> tuple[Request, Meter, dict[str, str]]:
    """Admit (plan, quota, rate limits), build the engine request and its meter; refuse before any byte is sent."""
    adm = platform.admit(caller, req.model, len(ids))
    request = Request(new_id("cmpl"), ids, sampling_params(req, model, len(ids), logprobs, adm.max_context),
                      priority=adm.priority, cache_salt=adm.cache_salt, adapter=model.adapter, grammar=grammar)
    check_capacity(model, request)
    return request, Meter(platform, caller, request.request_id, req.model, endpoint, len(ids)), adm.headers


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


async def collect(model: LoadedModel, request: Request, meter: Meter) -> tuple[list[Choice], int]:
    """The whole answer; its usage is committed before this returns."""
    choices = [Choice() for _ in range(request.params.n)]
    prompt_tokens = len(request.prompt_ids)
    try:
        async for d in stream_engine(model, request):
            meter.add(d)
            c = choices[d.index]
            c.text.append(d.text)
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs or []
            if d.finish_reason is not None:
                c.finish_reason = api_finish(d.finish_reason)
                c.completion_tokens = d.completion_tokens
    except BaseException:
        await meter.close("error")
        raise
    await meter.close()
    return choices, prompt_tokens


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
