"""What a hostile or careless tenant can do with schemas and tools: bounded in size, time and effect on others."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.server.smollm2_app import call

ASK = [{"role": "user", "content": "Hello"}]


def chat(server: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, _, text = call(server, "/v1/chat/completions", {"model": "smollm2", "messages": ASK, **body})
    return status, json.loads(text) if text.startswith("{") else {}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_oversized_inputs_are_refused_at_once(server: str) -> None:
    t0 = time.monotonic()
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(3000)}}
    status, err = chat(server, response_format=schema_format(big), max_tokens=5)
    assert status == 400 and err["param"] == "response_format" and "KiB" in err["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    status, err = chat(server, tools=[tool] * 129, max_tokens=5)
    assert status == 400 and err["param"] == "tools"
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": big}} for i in range(2)]
    status, err = chat(server, tools=many, max_tokens=5)
    assert status == 400 and err["param"] == "tools"
    assert time.monotonic() - t0 < 10


def test_pathological_schemas_neither_hang_nor_freeze_the_server(server: str) -> None:
    """Deep nesting, huge enums, heavy regexes: each is compiled in a worker thread with llguidance's limits,
    answered (or refused) in bounded time; meanwhile /health answers at once and other tenants are served."""
    hostile = [
        nested(400),
        {"enum": [f"value-{i}-{'z' * 20}" for i in range(4000)]},
        {"type": "string", "pattern": "^(a|aa|aaa)*(b|ab)*[a-z]{1,30}(x+x+)+y$"},
        {"type": "object", "properties": {f"k{i}": {"anyOf": [{"type": "integer"}, {"type": "string"},
                                                             {"type": "array", "items": {"type": "number"}}]}
                                          for i in range(200)}, "required": [f"k{i}" for i in range(200)]},
    ]
    stop = threading.Event()
    health: list[float] = []

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            assert call(server, "/health", key=None)[0] == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(hostile) + 1) as pool:
            hostile_runs = [pool.submit(chat, server, response_format=schema_format(s), max_tokens=8, temperature=0)
                            for s in hostile]
            neighbour = pool.submit(chat, server, max_tokens=8, temperature=0)
            results = [f.result(timeout=120) for f in hostile_runs]
            assert neighbour.result(timeout=120)[0] == 200
    finally:
        stop.set()
        prober.join()
    assert time.monotonic() - t0 < 120
    for status, body in results:
        assert status in (200, 400), body
        if status == 200:  # cut at 8 tokens, or finished: either way a clean answer
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert health and max(health) < 2.0, max(health)


def test_a_flood_of_distinct_schemas_is_served_and_the_cache_stays_bounded(server: str) -> None:
    schemas = [{"type": "object", "properties": {f"field_{i}": {"type": "integer", "minimum": i, "maximum": i + 5}},
                "required": [f"field_{i}"], "additionalProperties": False} for i in range(300)]
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda s: chat(server, response_format=schema_format(s), max_tokens=40, temperature=0),
                             schemas[:40]))
    complete = 0
    for (status, body), schema in zip(done, schemas, strict=False):
        assert status == 200, body
        if body["choices"][0]["finish_reason"] == "length":
            continue  # cut by max_tokens (the grammar allows whitespace between tokens): JSON left open
        complete += 1
        value = json.loads(body["choices"][0]["message"]["content"])
        (name, spec), = schema["properties"].items()
        assert set(value) == {name} and spec["minimum"] <= value[name] <= spec["maximum"]
    assert complete >= 30
    # The compiled-grammar cache keeps at most its size, however many schemas come.
    from souverain.engine.grammar import GrammarCompiler
    from tests.engine.toy import ByteTokenizer

    compiler = GrammarCompiler(ByteTokenizer(), 258, cache_size=16)
    for s in schemas:
        compiler.json_schema(s)
    assert len(compiler._cache) == 16


def test_cancelled_constrained_streams_free_the_engine(server: str) -> None:
    import http.client

    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": "smollm2", "messages": ASK, "stream": True, "max_tokens": 400,
                       "response_format": {"type": "json_object"}})
    for _ in range(4):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer sk-test-key",
                                                            "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.fp.readline()  # the first event, then hang up mid-answer
        conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if json.loads(call(server, "/v1/models/smollm2")[2])["status"]["running"] == 0:
            break
        time.sleep(0.1)
    assert json.loads(call(server, "/v1/models/smollm2")[2])["status"]["running"] == 0
