"""The HTTP API with the official SDKs, against a real server on loopback serving SmolLM2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.server.smollm2_app import KEY, QUESTION, call


def test_health_needs_no_key_and_echoes_request_id(server: str) -> None:
    status, headers, body = call(server, "/health", key=None, headers={"x-request-id": "abc-123"})
    assert status == 200 and json.loads(body)["status"] == "ok" and headers["x-request-id"] == "abc-123"


def test_auth(server: str) -> None:
    assert call(server, "/v1/models", key=None)[0] == 401
    status, _, body = call(server, "/v1/models", key="wrong")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _, body = call(server, "/ready")  # the "busy" model cannot take a request: not ready
    assert status == 503 and json.loads(body)["models"]["smollm2"] == "ready"


def test_openai_sdk(server: str) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(api_key=KEY, base_url=f"{server}/v1")
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["smollm2", "busy", "tiny-fim", "tiny-tekken", "minilm"]
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)


def test_mistral_sdk(server: str) -> None:
    from mistralai.client import Mistral

    client = Mistral(api_key=KEY, server_url=server)
    r = client.chat.complete(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20, random_seed=1)
    assert "Paris" in r.choices[0].message.content
    text = "".join(e.data.choices[0].delta.content or "" for e in
                   client.chat.stream(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
                   if e.data.choices)
    assert "Paris" in text
    assert client.models.retrieve(model_id="smollm2").max_context_length == 8192


def test_stream_ends_with_one_done(server: str) -> None:
    status, headers, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION,
                                                                  "stream": True, "max_tokens": 3, "temperature": 0})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_validation_errors_name_the_field(server: str) -> None:
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION,
                                                            "temperature": 5})
    assert status == 422 and "temperature" in json.loads(body)["message"]
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": []})
    assert status == 422 and "messages" in json.loads(body)["message"]


def test_queue_full_is_429_with_retry_after(server: str) -> None:
    status, headers, body = call(server, "/v1/chat/completions", {"model": "busy", "messages": QUESTION})
    assert status == 429 and headers["Retry-After"] == "1" and json.loads(body)["code"] == "queue_full"


def test_too_long_is_400_with_both_numbers(server: str) -> None:
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION,
                                                            "max_tokens": 8190})
    err = json.loads(body)
    assert status == 400 and err["code"] == "context_length_exceeded" and "8190" in err["message"]
    assert "8192" in err["message"]


def test_body_too_large_is_413(server: str) -> None:
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(17 << 20))  # announced; the server answers before reading it
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["message"]
    conn.close()


def test_disconnect_cancels_generation(server: str) -> None:
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "smollm2", "messages": QUESTION, "stream": True, "max_tokens": 4000,
                       "min_tokens": 4000, "temperature": 0.7})
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read(200)  # a few chunks arrive...
    def running():
        return float(dict(line.rsplit(" ", 1) for line in call(server, "/metrics")[2].splitlines()
                                     if line and not line.startswith("#"))[
            'souverain:num_requests_running{model_name="smollm2"}'])
    for _ in range(100):
        if running() == 1:
            break
        time.sleep(0.1)
    assert running() == 1
    conn.close()  # ...then the client goes away
    for _ in range(100):
        if running() == 0:
            break
        time.sleep(0.1)
    assert running() == 0


def test_prefix_continues_the_assistant(server: str) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": "The capital of France is", "prefix": True}]
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": messages,
                                                            "temperature": 0, "max_tokens": 8})
    content = json.loads(body)["choices"][0]["message"]["content"]
    # As Mistral's API: the answer starts with the prefix (its docs read content[len(prefix):]).
    assert status == 200 and content.startswith("The capital of France is") and "Paris" in content[24:]
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": messages, "stream": True,
                                                            "temperature": 0, "max_tokens": 8})
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in body.splitlines()
                   if line.startswith("data: {"))
    assert text == content


def test_text_completions_and_seed(server: str) -> None:
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.9, "seed": 3}
    a = json.loads(call(server, "/v1/completions", body)[2])
    b = json.loads(call(server, "/v1/completions", body)[2])
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["object"] == "text_completion"


def test_logprobs(server: str) -> None:
    status, _, body = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "temperature": 0,
                                                            "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    content = json.loads(body)["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 3 and len(content[0]["top_logprobs"]) == 2
    first = content[0]
    assert isinstance(first["token_id"], int) and first["top_logprobs"][0]["token_id"] == first["token_id"]
    # The mistralai SDK keeps entries only when they carry token_id.
    from mistralai.client import Mistral

    r = Mistral(api_key=KEY, server_url=server).chat.complete(model="smollm2", messages=QUESTION, temperature=0,
                                                              max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == 3


def test_empty_prompt_is_a_400(server: str) -> None:
    status, _, body = call(server, "/v1/completions", {"model": "smollm2", "prompt": "", "max_tokens": 2})
    assert status == 400 and json.loads(body)["param"] == "prompt"


def test_legacy_completions_logprobs_and_usage(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(api_key=KEY, base_url=f"{server}/v1")
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) >= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    chunks = list(client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            logprobs=1))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 4


SENTENCES = [
    "The capital of France is Paris.", "Paris est la capitale de la France.", "Berlin is in Germany.",
    "I like turtles.", "Turtles are slow animals.", "The stock market fell today.", "Stocks dropped sharply.",
    "How do I bake bread?", "Bread needs flour, water, yeast and salt.", "Le chat dort sur le canapé.",
    "The cat sleeps on the sofa.", "Die Katze schläft auf dem Sofa.", "Quantum computers use qubits.",
    "def add(a, b): return a + b", "SELECT name FROM users;", "🤗 emojis are fun", "日本の首都は東京です。",
    "", "a " * 400, "The weather is nice today.",
]


def test_embeddings_match_sentence_transformers(server: str, minilm_path: Path) -> None:
    import base64

    import numpy as np
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    client = OpenAI(api_key=KEY, base_url=f"{server}/v1")
    got = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=SENTENCES).data])
    ref = SentenceTransformer(str(minilm_path), device="cpu").encode(SENTENCES)
    assert np.abs(got @ got.T - ref @ ref.T).max() <= 1e-4
    one = client.embeddings.create(model="minilm", input=SENTENCES[0], encoding_format="base64")
    raw = one.data[0].embedding
    vec = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    assert np.abs(vec - got[0]).max() <= 1e-6 and one.usage.prompt_tokens > 0


def test_mistral_sdk_embeddings(server: str) -> None:
    from mistralai.client import Mistral

    client = Mistral(api_key=KEY, server_url=server)
    r = client.embeddings.create(model="minilm", inputs=["Bonjour", "Hello"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    status, _, body = call(server, "/v1/embeddings", {"model": "smollm2", "input": "x"})
    assert status == 404 and "minilm" not in body


def test_fim(server: str) -> None:
    from mistralai.client import Mistral

    status, _, body = call(server, "/v1/fim/completions", {"model": "smollm2", "prompt": "def f(", "suffix": "x"})
    assert status == 400 and "fill-in-the-middle" in json.loads(body)["message"]
    client = Mistral(api_key=KEY, server_url=server)
    r = client.fim.complete(model="tiny-fim", prompt="def add(a, b):", suffix="    return c", max_tokens=5,
                            temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens == len(load_tokenizer_v3().encode_fim("def add(a, b):", "    return c"))


def load_tokenizer_v3():
    from souverain import load_tokenizer
    from tests.tokenizer.mistral_files import mistral_file

    return load_tokenizer(mistral_file("v3"))


def test_metrics(server: str) -> None:
    call(server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": 2})
    status, headers, body = call(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    assert float(lines['souverain:generation_tokens_total{model_name="smollm2"}']) >= 2
    assert 'souverain:time_to_first_token_seconds_count{model_name="smollm2"}' in lines
    assert call(server, "/metrics", key=None)[0] == 401


def test_json_mode_parses(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(api_key=KEY, base_url=f"{server}/v1")
    r = client.chat.completions.create(
        model="smollm2", max_tokens=200, response_format={"type": "json_object"}, temperature=0,
        messages=[{"role": "user", "content": 'Answer in JSON, as {"capital": ...}: what is the capital of France?'}])
    assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content
    # A budget too small for the object: cut where it stopped, and said so (as OpenAI's API does).
    r = client.chat.completions.create(
        model="smollm2", max_tokens=3, response_format={"type": "json_object"}, temperature=0,
        messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}])
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.lstrip().startswith("{")
