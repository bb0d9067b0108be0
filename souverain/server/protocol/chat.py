"""Chat and text completion requests: one schema accepts Mistral's and OpenAI's parameters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    prefix: bool = False  # Mistral: continue this (final, assistant) message
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's and Mistral's `json_schema` (the same shape: name, schema, strict, description)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class Sampling(BaseModel):
    """Parameters shared by chat, FIM and text completions."""

    # Unknown parameters are kept so that the routes can refuse the ones they cannot honour by name
    # (nothing silently ignored); `IGNORED` lists those accepted on purpose.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name
    min_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    random_seed: int | None = Field(None, ge=0)  # Mistral
    seed: int | None = None  # OpenAI
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    n: int = Field(1, ge=1, le=16)
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) -> bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # A Modelfile's num_predict (server.defaults): capped by the room the prompt leaves, never an error.
    _default_max_tokens: int | None = PrivateAttr(None)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("at most 16 non-empty strings")
        return stops


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    safe_prompt: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Sampling):
    """OpenAI's legacy /v1/completions."""

    prompt: str | list[str]  # one prompt per request (a list of one is accepted)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None


class FIMCompletionRequest(Sampling):
    """Mistral's /v1/fim/completions."""

    prompt: str
    suffix: str | None = None


# Accepted and ignored on purpose (README "API"): labels and hints that change nothing in the answer.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


# Values of otherwise unsupported parameters that ask for nothing beyond what the server does anyway.
HONOURED = {"modalities": (["text"],), "service_tier": ("auto", "default")}


def unsupported(req: BaseModel) -> str | None:
    """The first parameter sent with a value this server cannot honour, or None."""
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED or value is None or value is False or value in ({}, [], "") or \
                value in HONOURED.get(name, ()):
            continue
        return name
    return None
