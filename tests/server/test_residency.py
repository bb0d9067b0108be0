"""Keep-alive, `stop` and the LRU cap: an unloaded model frees its engine and answers the same once loaded again."""

from __future__ import annotations

import asyncio
import time

import pytest

from souverain.engine.async_engine import AsyncEngine
from souverain.engine.request import Request, SamplingParams
from souverain.server.residency import Residency, parse_duration
from tests.engine.toy import make_engine, tiny_model, tokens_of

PARAMS = SamplingParams(temperature=0, max_tokens=8)


def engine_pair() -> tuple[AsyncEngine, list[int]]:
    built: list[int] = []

    def build():  # type: ignore[no-untyped-def]
        built.append(1)
        return make_engine(tiny_model("dense"))

    return AsyncEngine(build(), rebuild=build), built


async def ask(engine: AsyncEngine, rid: str) -> list[int]:
    return tokens_of([d async for d in engine.generate(Request(rid, [1, 2, 3], PARAMS))])


def test_unload_frees_the_engine_and_the_next_request_loads_it_again() -> None:
    engine, built = engine_pair()

    async def main() -> None:
        first = await ask(engine, "a")
        assert engine.unload() and not engine.loaded
        assert engine.engine.model is None and engine.engine.cache is None  # weights and KV cache dropped
        assert engine.engine.args.vocab_size == 258 and engine.engine.max_model_len > 0  # still described
        assert await ask(engine, "b") == first and engine.loaded and len(built) == 2
        assert engine.engine.stats.requests_finished == 2  # counters carry over the reload

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_busy_engine_is_not_unloaded_and_concurrent_requests_load_once() -> None:
    engine, built = engine_pair()

    async def main() -> None:
        stream = engine.generate(Request("long", [1, 2, 3], SamplingParams(temperature=0, max_tokens=200)))
        await stream.__anext__()  # answering
        assert not engine.unload() and engine.loaded
        await stream.aclose()
        await engine.finished("long")
        assert engine.unload()
        answers = await asyncio.gather(*(ask(engine, f"r{i}") for i in range(6)))
        assert len({tuple(a) for a in answers}) == 1 and len(built) == 2  # one load served all six

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_keep_alive_unloads_idle_models_and_the_cap_unloads_the_least_recent() -> None:
    (a, _), (b, _), (c, _) = engine_pair(), engine_pair(), engine_pair()
    residency = Residency(keep_alive=0.2, max_loaded=2)
    for name, engine in (("a", a), ("b", b), ("c", c)):
        residency.add(name, engine, size=1)

    async def main() -> None:
        await ask(a, "1")
        await ask(b, "2")
        c.unload()
        await ask(c, "3")  # a third loaded: the least recently used (a) makes room
        assert not a.loaded and b.loaded and c.loaded
        assert residency.until(c) is not None and residency.until(a) is None
        time.sleep(0.3)
        assert sorted(residency.reap()) == ["b", "c"] and not (a.loaded or b.loaded or c.loaded)

    try:
        asyncio.run(main())
    finally:
        for engine in (a, b, c):
            engine.shutdown()


@pytest.mark.parametrize(("text", "seconds"), [("300", 300), ("30s", 30), ("5m", 300), ("1h", 3600),
                                               ("-1", None), ("forever", None), ("0", 0), ("250ms", 0.25)])
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 minutes", "-5m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(text)
