"""The engine on a CUDA device gives what the simple loop gives there."""

from __future__ import annotations

import pytest
import torch

from souverain.engine.request import Request, SamplingParams
from souverain.engine.simple import generate_tokens
from tests.engine.toy import EOS, make_engine, run_all, tiny_model, tokens_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["dense", "sliding_window", "moe"])
def test_engine_on_cuda(name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(name).cuda()
    engine = make_engine(model, blocks=20, max_batched_tokens=16)  # small: preemption happens too
    prompts = [[1, 2, 3], list(range(30)), list(range(50, 90)), [7] * 17]
    params = SamplingParams(temperature=0, max_tokens=10)
    out = run_all(engine, {0: [Request(f"r{i}", p, params) for i, p in enumerate(prompts)]})
    for i, p in enumerate(prompts):
        assert tokens_of(out[(f"r{i}", 0)]) == list(generate_tokens(model, p, max_tokens=10, stop_ids=[EOS]))
    assert engine.blocks.num_free == engine.blocks.num_blocks
