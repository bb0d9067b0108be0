"""Structured outputs and function calling through both SDKs, against the real server (SmolLM2, tiny Mistral models)."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.server.smollm2_app import KEY, call

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    city: str = Field(max_length=30)
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    favourite: Colour
    hobbies: list[str] = Field(max_length=3)
    address: Address


def openai(server: str) -> Any:
    from openai import OpenAI

    return OpenAI(api_key=KEY, base_url=f"{server}/v1")


def mistral(server: str) -> Any:
    from mistralai.client import Mistral

    return Mistral(api_key=KEY, server_url=server)


def test_openai_parse_valid_on_every_seed(server: str) -> None:
    client = openai(server)
    for seed in range(10):
        r = client.chat.completions.parse(
            model="smollm2", temperature=1.0, seed=seed, max_tokens=400, response_format=Person,
            messages=[{"role": "user", "content": "Invent a person who lives in France."}])
        person = r.choices[0].message.parsed
        assert isinstance(person, Person), (seed, r.choices[0].message.content)
        assert 0 <= person.age <= 120 and len(person.hobbies) <= 3


def test_mistral_parse_valid_on_every_seed(server: str) -> None:
    client = mistral(server)
    for seed in range(10):
        r = client.chat.parse(Person, model="smollm2", temperature=1.0, random_seed=seed, max_tokens=400,
                              messages=[{"role": "user", "content": "Invent a person who lives in France."}])
        assert isinstance(r.choices[0].message.parsed, Person), (seed, r.choices[0].message.content)


def test_json_schema_shapes_and_unsupported_keywords(server: str) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 30, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}}
    status, _, text = call(server, "/v1/chat/completions", body)
    assert status == 200 and isinstance(json.loads(json.loads(text)["choices"][0]["message"]["content"])["ok"], bool)
    bad = {**schema, "properties": {"ok": {"not": {"type": "string"}}}}
    status, _, text = call(server, "/v1/chat/completions", {**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": bad}}})
    err = json.loads(text)
    assert status == 400 and err["param"] == "response_format" and "not" in err["message"], err
    status, _, text = call(server, "/v1/chat/completions", {**body, "response_format": {"type": "json_schema"}})
    assert status == 400 and "schema" in json.loads(text)["param"]
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(?=x)"}}}}}
    status, _, text = call(server, "/v1/chat/completions", {**body, "response_format": None, "tools": [bad_tool]})
    assert status == 400 and json.loads(text)["param"] == "tools" and "f" in json.loads(text)["message"]


@pytest.mark.parametrize("sdk", ["openai", "mistral"])
def test_forced_and_named_tool_choices_call(server: str, sdk: str) -> None:
    for choice in ("required" if sdk == "openai" else "any", {"type": "function", "function": {"name": "add"}}):
        if sdk == "openai":
            r = openai(server).chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, ADD],
                                                       tool_choice=choice, temperature=0, max_tokens=120,
                                                       parallel_tool_calls=False)
        else:
            r = mistral(server).chat.complete(model="smollm2", messages=ASK, tools=[WEATHER, ADD],
                                              tool_choice=choice, temperature=0, max_tokens=120,
                                              parallel_tool_calls=False)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        call0 = c.message.tool_calls[0]
        args = call0.function.arguments
        args = json.loads(args) if isinstance(args, str) else args
        if isinstance(choice, dict):
            assert call0.function.name == "add" and set(args) == {"a", "b"}
        else:
            assert call0.function.name in ("get_weather", "add")
        assert call0.id.startswith("call_") and len(call0.id) == 29


def test_auto_none_and_a_full_tool_loop(server: str) -> None:
    client = openai(server)
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=60)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], temperature=0,
                                       max_tokens=80)  # auto: either is fine, but it must be well formed
    m = r.choices[0].message
    assert (m.tool_calls and r.choices[0].finish_reason == "tool_calls") or (m.content and not m.tool_calls)
    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=80, parallel_tool_calls=False)
    tc = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=60)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_parallel_calls_only_when_allowed(server: str) -> None:
    ask = [{"role": "user", "content": "Call add twice: 1+2 and 3+4. Use one tool_call block for each."}]
    client = openai(server)
    counts = set()
    for seed in range(6):
        r = client.chat.completions.create(model="smollm2", messages=ask, tools=[ADD], tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False)
        counts.add(len(r.choices[0].message.tool_calls))
    assert counts == {1}
    # Allowed: the grammar takes one call block after another (this small model, greedy, repeats its call).
    r = client.chat.completions.create(model="smollm2", messages=ask, tools=[ADD], tool_choice="required",
                                       temperature=0, max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    assert all(c.function.name == "add" for c in calls)


@pytest.mark.parametrize("sdk", ["openai", "mistral"])
def test_streamed_tool_calls_assemble(server: str, sdk: str) -> None:
    kw: dict[str, Any] = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "temperature": 0,
                          "max_tokens": 80, "parallel_tool_calls": False}
    if sdk == "openai":
        client = openai(server)
        whole = client.chat.completions.create(**kw, tool_choice="required").choices[0].message.tool_calls[0]
        with client.chat.completions.stream(**kw, tool_choice="required") as stream:
            pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
            final = stream.get_final_completion()
        got = final.choices[0].message.tool_calls[0]
        assert len(pieces) > 1  # arguments came in pieces
        assert final.choices[0].finish_reason == "tool_calls"
    else:
        client = mistral(server)
        whole = client.chat.complete(**kw, tool_choice="any").choices[0].message.tool_calls[0]
        name, args, finish = "", "", None
        for event in client.chat.stream(**kw, tool_choice="any"):
            for c in event.data.choices:
                for tc in c.delta.tool_calls or []:
                    name += tc.function.name
                    args += tc.function.arguments if isinstance(tc.function.arguments, str) else json.dumps(
                        tc.function.arguments)
                finish = c.finish_reason or finish
        got = type("Call", (), {"function": type("F", (), {"name": name, "arguments": args})})()
        assert finish == "tool_calls"
    assert got.function.name == whole.function.name == "get_weather"
    assert json.loads(got.function.arguments) == json.loads(whole.function.arguments)


def test_content_parts_and_parameters_never_silently_dropped(server: str) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": image})
    err = json.loads(text)
    assert status == 400 and "image_url" in err["message"] and err["param"] == "messages[0].content[1].type"
    for param, value in (("prediction", {"type": "content", "content": "x"}), ("audio", {"voice": "alloy"}),
                         ("modalities", ["text", "audio"]), ("logit_bias", {"hello": 5}), ("logit_bias", {"42": 500}),
                         ("logit_bias", {"²": 5})):
        status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK, param: value})
        assert status == 400 and json.loads(text)["param"] == param, (param, text)
    ollama_style = [{"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}]
    status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ollama_style})
    assert status == 400 and json.loads(text)["param"] == "messages[0].images"
    status, _, _ = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK, "max_tokens": 2,
                                                         "user": "ann", "metadata": {"k": "v"}})
    assert status == 200  # accepted and ignored on purpose (README)
    status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK,
                                                            "tools": [{"type": "retrieval"}]})
    assert status == 400 and json.loads(text)["param"] == "tools"
    status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK, "tools": [WEATHER],
                                                            "tool_choice": {"type": "function",
                                                                            "function": {"name": "nope"}}})
    assert status == 400 and json.loads(text)["param"] == "tool_choice"


@pytest.mark.parametrize("model", ["tiny-fim", "tiny-tekken"])
def test_mistral_format_models(server: str, model: str) -> None:
    """Random weights: only the grammar makes them call. The call comes back parsed from [TOOL_CALLS], with
    Mistral's 9-character id, and goes back into the next prompt through mistral-common."""
    client = mistral(server)
    r = client.chat.complete(model=model, messages=ASK, tools=[WEATHER, ADD], tool_choice="any", temperature=0,
                             max_tokens=150, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    tc = c.message.tool_calls[0]
    assert tc.function.name in ("get_weather", "add") and len(tc.id) == 9 and tc.id.isalnum()
    args = tc.function.arguments
    assert isinstance(json.loads(args) if isinstance(args, str) else args, dict)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [tc.model_dump()]},
               {"role": "tool", "tool_call_id": tc.id, "name": tc.function.name, "content": "21 degrees"}]
    r = client.chat.complete(model=model, messages=history, tools=[WEATHER, ADD], tool_choice="none",
                             temperature=0, max_tokens=5)
    assert r.choices[0].message.tool_calls is None


def test_logit_bias(server: str) -> None:
    client = openai(server)
    plain = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=4, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    forced = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=3,
                                            logprobs=True, logit_bias={"42": 100})
    assert [t.token_id for t in forced.choices[0].logprobs.content] == [42, 42, 42]  # type: ignore[attr-defined]
    banned = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=4, logprobs=True,
                                            logit_bias={str(first.token_id): -100})  # type: ignore[attr-defined]
    assert banned.choices[0].logprobs.content[0].token != first.token


def test_model_card_says_function_calling(server: str) -> None:
    status, _, text = call(server, "/v1/models/smollm2")
    assert status == 200 and json.loads(text)["capabilities"]["function_calling"] is True
