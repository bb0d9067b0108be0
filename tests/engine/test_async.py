"""The asyncio front: streams per request, overload at once, cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import threading

import pytest

from souverain.engine.async_engine import AsyncEngine
from souverain.engine.request import EngineOverloaded, FinishReason, Request, SamplingParams
from tests.engine.toy import make_engine, tiny_model, tokens_of


def test_concurrent_streams_match_sequential() -> None:
    model = tiny_model("dense")
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10] * 20]

    async def collect(engine: AsyncEngine, i: int, p: list[int]) -> list:
        return [d async for d in engine.generate(Request(f"r{i}", p, params))]

    async def main() -> tuple[list, list]:
        engine = AsyncEngine(make_engine(model))
        try:
            together = await asyncio.gather(*(collect(engine, i, p) for i, p in enumerate(prompts)))
            one_by_one = [await collect(engine, 10 + i, p) for i, p in enumerate(prompts)]
        finally:
            engine.shutdown()
        return together, one_by_one

    together, one_by_one = asyncio.run(main())
    for a, b in zip(together, one_by_one, strict=True):
        assert tokens_of(a) == tokens_of(b)
        assert a[-1].finish_reason is FinishReason.LENGTH and a[-1].completion_tokens == 10


def test_leaving_early_cancels_and_frees() -> None:
    llm = make_engine(tiny_model("dense"))

    async def main() -> None:
        engine = AsyncEngine(llm)
        try:
            stream = engine.generate(Request("long", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True)))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(200):
                if not llm.has_unfinished():
                    break
                await asyncio.sleep(0.01)
        finally:
            engine.shutdown()

    asyncio.run(main())
    assert not llm.has_unfinished()
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_overload_is_immediate() -> None:
    llm = make_engine(tiny_model("dense"), max_waiting=2)
    gate = threading.Event()
    step = llm.step
    llm.step = lambda: (gate.wait(), step())[1]  # type: ignore[method-assign] # hold the thread

    async def main() -> None:
        engine = AsyncEngine(llm)
        try:
            params = SamplingParams(max_tokens=5)
            streams = [engine.generate(Request(f"r{i}", [1, 2], params)) for i in range(3)]
            first = [asyncio.ensure_future(s.__anext__()) for s in streams[:2]]
            await asyncio.sleep(0.05)
            # Two are queued (in the thread's inbox or its waiting list): the third is refused now.
            with pytest.raises(EngineOverloaded):
                await streams[2].__anext__()
            gate.set()
            # Both first deltas arrive before the streams are closed: closing one whose __anext__ is
            # still pending is an error of the test, not of the engine (seen once in a full run).
            assert [d.request_id for d in await asyncio.gather(*first)] == ["r0", "r1"]
            for s in streams[:2]:
                await s.aclose()
        finally:
            gate.set()
            engine.shutdown()

    asyncio.run(main())
