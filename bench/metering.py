"""What write-ahead metering costs a tenant: streamed chat through the HTTP API with an organisation's key
(metered: every chunk waits for the commit that bills it) against the operator's static key (not metered),
on the same server, in the same run, alternating rounds.

Run: .venv/bin/python -m bench.metering [--concurrency 1,16] [--tokens 64] [--rounds 3]

Starts `souverain serve` (SmolLM2-135M-Instruct, the defaults) with a throw-away home and SQLite database;
the organisation's key is the first-start key (enterprise plan: no rate limit gets in the way). Prints the
median time to first token and the aggregate tok/s for each kind, and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.structured import free_port, link_model_store, start_server

KEY = "sk-bench"  # the operator's static key, as bench/structured.py starts the server


async def round_(client: Any, n: int, tokens: int, salt: int) -> tuple[float, float]:
    """(median seconds to the first token, aggregate tok/s) of n concurrent streams."""
    async def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        first, count = 0.0, 0
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Tell me about city number {salt * 100 + i}."}],
            max_tokens=tokens, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": tokens})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not first:
                first = time.perf_counter() - t0
            if chunk.usage:
                count = chunk.usage.completion_tokens
        return first, count

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return statistics.median(f for f, _ in done), sum(c for _, c in done) / wall


async def bench(port: int, org_key: str, levels: list[int], tokens: int, rounds: int) -> list[tuple[Any, ...]]:
    from openai import AsyncOpenAI

    clients = {kind: AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=600)
               for kind, key in (("operator", KEY), ("metered", org_key))}
    for c in clients.values():
        await round_(c, 2, 8, 0)  # warm-up
    rows, salt = [], 1
    for n in levels:
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in clients}
        for _ in range(rounds):
            for kind, client in clients.items():
                got[kind].append(await round_(client, n, tokens, salt))
                salt += 1
        med = {k: (statistics.median(t for t, _ in v), statistics.median(r for _, r in v)) for k, v in got.items()}
        rows.append((n, *med["operator"], *med["metered"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        link_model_store(home)
        proc = start_server(port, home)
        try:
            text = (Path(home) / "first-start.txt").read_text()
            org_key = next(line.split()[-1] for line in text.splitlines() if "API key" in line)
            rows = asyncio.run(bench(port, org_key, [int(x) for x in a.concurrency.split(",")], a.tokens, a.rounds))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"SmolLM2-135M int4, streamed chat over HTTP, {a.tokens} tokens each, median of {a.rounds} rounds")
    print(f"{'streams':>7} {'TTFT operator':>14} {'TTFT metered':>13} {'ratio':>6} {'tok/s operator':>15} "
          f"{'tok/s metered':>14} {'ratio':>6}")
    for n, t_op, r_op, t_me, r_me in rows:
        print(f"{n:>7} {t_op * 1e3:>12.0f}ms {t_me * 1e3:>11.0f}ms {t_me / t_op:>6.2f} {r_op:>15.1f} {r_me:>14.1f} "
              f"{r_me / r_op:>6.2f}")


if __name__ == "__main__":
    main()
