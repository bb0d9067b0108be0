"""Weight-only int8: a module swap whose logits stay close to the bf16 model's."""

from __future__ import annotations

import pytest
import torch

from souverain.model.quant import QuantLinear, quantize
from tests.model.test_cache import ARGS, random_model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["dense", "tied", "moe"])
def test_quantised_model_tracks_bf16(name: str, bits: int) -> None:
    ref = random_model(ARGS[name]).to(torch.bfloat16)
    q = quantize(random_model(ARGS[name]).to(torch.bfloat16), bits=bits, dense_rows=0)
    assert any(isinstance(m, QuantLinear) and m.bits == bits for m in q.modules())
    assert q.output is not None  # the tied projection got its own int8 copy
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(tokens).float(), q(tokens).float()
    tol = 0.05 if bits == 8 else 0.25  # random weights are the worst case for 16 levels
    assert (a - b).abs().max().item() < tol * a.abs().max().item(), name
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.75, name


def test_int4_is_exact_on_a_4_bit_grid() -> None:
    """Weights already on a Q4_1-style grid (32-value blocks, 16 steps from min to max) come back
    as they were, up to bf16 rounding of scale and zero."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 128), generator=g).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every block spans the whole grid, as Q4_1 blocks do
    scale = torch.rand(64, 4, 1, generator=g).mul(0.01).add(0.001).to(torch.bfloat16).float()
    low = torch.randn(64, 4, 1, generator=g).mul(0.05).to(torch.bfloat16).float()
    w = (q.reshape(64, 4, 32) * scale + low).reshape(64, 128)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    ql = QuantLinear(lin, 4, dense_rows=0)
    # Unit vectors, one row at a time (the int4 kernel): row i of the result is column i of w.
    cols = torch.cat([ql(torch.eye(128)[i : i + 1]).float() for i in range(128)])  # [K, N]
    assert (cols.T - w).abs().max().item() < 2e-3 * w.abs().max().item()


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_and_prefill_paths_agree(bits: int) -> None:
    lin = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    q = QuantLinear(lin, bits, dense_rows=4)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        small = torch.cat([q(x[i : i + 1]) for i in range(6)])  # int8 kernel
        big = q(x)  # dense bf16 copy
        exact = lin(x)
    assert (small.float() - exact.float()).abs().max().item() < (0.05 if bits == 8 else 0.3)
    assert (big.float() - exact.float()).abs().max().item() < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 6])  # the int kernels, and the dense copy
def test_fused_projections_equal_separate_ones(bits: int, rows: int) -> None:
    """wq/wk/wv and w1/w3 fused into one matmul each give the separate projections' output, with
    an adapter on some rows too (its update is added to each part of the split)."""
    import copy

    from souverain.model.lora import LoraBatch
    from tests.engine.test_lora import random_adapter
    from tests.engine.toy import tiny_model

    base = tiny_model("dense").to(torch.bfloat16)
    fused = quantize(copy.deepcopy(base), bits=bits)
    separate = quantize(copy.deepcopy(base), bits=bits, fuse=False)
    assert fused.layers[0].attention.wqkv is not None and fused.layers[0].attention.wq is None
    assert separate.layers[0].attention.wqkv is None and separate.layers[0].feed_forward.w13 is None
    adapter = random_adapter(base, 3)
    tokens = torch.randint(0, 256, (1, rows))
    lora = LoraBatch.from_slots([adapter], [0 if i % 2 else -1 for i in range(rows)], torch.device("cpu"))
    with torch.no_grad():
        for batch in (None, lora):
            a, b = fused(tokens, lora=batch).float(), separate(tokens, lora=batch).float()
            assert (a - b).abs().max().item() <= 1e-2 * b.abs().max().item()
