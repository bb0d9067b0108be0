"""A mixture of experts with quantised experts in its one-call C++ form (decoder.cpp's Moe, set by `prepare`)
against the module's own steps done by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from souverain import kernels
from souverain.kernels.backend import Backend, available
from souverain.model.moe import MoeFeedForward
from souverain.model.quant import prepare, quantize
from tests.model.test_cache import ARGS, random_model

fast = kernels.load()
CPU_BACKENDS = [name for name in available(fast) if name != "torch"]
each_backend = pytest.mark.parametrize("name", CPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no C++ kernels here (no compiler): mixtures of experts keep the PyTorch form"))])


def prepared_moe(name: str) -> MoeFeedForward:
    model = prepare(quantize(random_model(ARGS["moe"]).to(torch.bfloat16), bits=4), Backend(name, fast))
    moe = model.layers[0].feed_forward
    assert isinstance(moe, MoeFeedForward) and moe.fused is not None
    return moe


def by_hand(moe: MoeFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the top-2 of the router's logits, their softmax, each chosen expert's quantised
    projections (the same int4 products), summed in fp32."""
    assert moe.w13s is not None and moe.w2s is not None
    out = torch.zeros(x.shape, dtype=torch.float32)
    logits = moe.gate(x).float()
    for i in range(x.shape[0]):
        top = torch.topk(logits[i], moe.top_k)
        for w, e in zip(torch.softmax(top.values, -1), top.indices.tolist(), strict=True):
            gate, up = moe.w13s[e](x[i : i + 1]).float().chunk(2, dim=-1)
            out[i] += w * moe.w2s[e]((F.silu(gate) * up).to(torch.bfloat16))[0].float()
    return out


@each_backend
@torch.inference_mode()
def test_fused_moe_is_the_routing_done_by_hand(name: str) -> None:
    moe = prepared_moe(name)
    x = torch.randn(7, 64).to(torch.bfloat16)
    want = by_hand(moe, x)
    got = moe(x)  # the module's forward takes the C++ form
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(got, moe.fused(x))
    # bf16 roundings (the gate's swiglu, each weighted output, the sum) apart, the same numbers.
    assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    # The PyTorch form of the same module agrees as closely.
    fused, moe.fused = moe.fused, None
    try:
        assert (moe(x).float() - got.float()).abs().max().item() <= 1e-2 * want.abs().max().item()
    finally:
        moe.fused = fused
    # Leading dimensions are kept, as the module's forward keeps them.
    assert torch.equal(moe(x.view(1, 7, 64))[0], got)


@each_backend
@torch.inference_mode()
def test_fused_moe_gives_a_token_the_same_bits_in_any_batch(name: str) -> None:
    moe = prepared_moe(name)
    x = torch.randn(33, 64).to(torch.bfloat16)
    whole = moe(x)
    for i in (0, 16, 32):
        assert torch.equal(moe(x[i : i + 1]), whole[i : i + 1])
    assert torch.equal(moe(x[5:9]), whole[5:9])
    assert moe(x[:0]).shape == (0, 64)


@each_backend
def test_fused_moe_refuses_other_dtypes_and_keeps_autograd_on_pytorch(name: str) -> None:
    moe = prepared_moe(name)
    assert moe.fused is not None
    with pytest.raises(RuntimeError, match="bfloat16"):
        moe.fused(torch.randn(3, 64))
    # float32 input, or input that needs gradients, takes the PyTorch form (no C++ call to refuse it).
    with torch.no_grad():
        assert moe(torch.randn(3, 64)).shape == (3, 64)
