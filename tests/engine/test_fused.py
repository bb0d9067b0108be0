"""The C++ decoder (souverain/engine/fused.py) gives the Python forward's logits to the bit."""

from __future__ import annotations

import pytest
import torch

from souverain import kernels
from souverain.engine.request import Request, SamplingParams
from souverain.model import ModelArgs, Transformer
from souverain.model.args import MoeArgs
from souverain.model.quant import quantize
from tests.engine.toy import make_engine, run_all, tokens_of

fast = kernels.load()
pytestmark = pytest.mark.skipif(fast is None, reason="no C++ kernels here: the engine keeps the Python forward")

# head_dim 32 and blocks of 16: shapes the decode kernels take.
BASE = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=258, max_seq_len=512,
            head_dim=32)
CASES = {
    "int4": (dict(), dict(bits=4)),  # fused [q|k|v] and [gate|up]; AMX tiles where there is AMX
    "int8_unfused": (dict(), dict(bits=8, fuse=False)),
    "bf16_bias": (dict(attention_bias=True, mlp_bias=True), None),  # plain nn.Linear with biases
    "sliding_window": (dict(sliding_window=24), dict(bits=4)),
    "moe_int4": (dict(moe=MoeArgs(num_experts=4, num_experts_per_tok=2)), dict(bits=4)),  # router, grouping, experts
}


def model_for(case: str) -> Transformer:
    extra, quant = CASES[case]
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**BASE, **extra))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.to(torch.bfloat16).eval()
    if quant is not None:
        quantize(model, **quant)
    return model


class Counting:
    """The decoder, counting its calls."""

    def __init__(self, decoder: object) -> None:
        self.decoder, self.calls = decoder, 0

    def forward(self, *args: object) -> torch.Tensor:
        self.calls += 1
        return self.decoder.forward(*args)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("case", "int8_values"), [(c, True) for c in CASES] + [("int4", False)])
def test_decoder_logits_equal_the_python_forward(case: str, int8_values: bool) -> None:
    engine = make_engine(model_for(case), block_size=16, max_batched_tokens=64, int8_values=int8_values)
    assert (engine.cache.v8 is not None) == int8_values  # the values' int8 copy, which both paths read
    runner = engine.runner
    assert runner.decoder is not None
    counting = Counting(runner.decoder)
    python_forward = runner.forward
    compared = []

    def both(items, adapter=None):  # type: ignore[no-untyped-def]
        # The KV write is the same in both paths, so running the step twice is harmless.
        runner.decoder = counting
        calls = counting.calls
        fused = python_forward(items, adapter)
        runner.decoder = None
        plain = python_forward(items, adapter)
        if counting.calls > calls:
            compared.append(len(items))
            assert torch.equal(fused, plain)
        return fused

    runner.forward = both  # type: ignore[method-assign]
    # Prompts of different lengths (one past the sliding window), finishing at different steps: decode
    # steps of 1 to 6 rows, so both the small-batch kernels (up to 4 rows) and the dense path run.
    requests = [Request(f"r{i}", [(7 * i + j) % 250 for j in range(5 + 9 * i)],
                        SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True)) for i in range(6)]
    out = run_all(engine, {0: requests[:4], 3: requests[4:]})
    assert {len(tokens_of(out[(f"r{i}", 0)])) for i in range(6)} == {6 + 5 * i for i in range(6)}
    assert min(compared) == 1 and max(compared) == 6


def test_decoder_is_not_used_where_it_does_not_apply() -> None:
    fp32 = Transformer(ModelArgs(**BASE)).eval()  # type: ignore[arg-type]
    assert make_engine(fp32, block_size=16).runner.decoder is None
    odd = Transformer(ModelArgs(**{**BASE, "head_dim": 16})).to(torch.bfloat16).eval()  # type: ignore[arg-type]
    assert make_engine(odd, block_size=16).runner.decoder is None


def test_decoder_refuses_a_linear_without_weights() -> None:
    assert fast is not None
    with pytest.raises(RuntimeError, match="give weight"):
        fast.Linear(bits=4)
