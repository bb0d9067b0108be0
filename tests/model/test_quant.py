"""Weight-only int8: a module swap whose logits stay close to the bf16 model's."""

from __future__ import annotations

import torch

from souverain.model.quant import Int8Linear, quantize_int8
from tests.model.test_cache import ARGS, random_model


def test_int8_model_tracks_bf16() -> None:
    for name in ("dense", "tied", "moe"):
        ref = random_model(ARGS[name]).to(torch.bfloat16)
        q = quantize_int8(random_model(ARGS[name]).to(torch.bfloat16))
        assert any(isinstance(m, Int8Linear) for m in q.modules())
        assert q.output is not None  # the tied projection got its own int8 copy
        tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = ref(tokens).float(), q(tokens).float()
        assert (a - b).abs().max().item() < 0.05 * a.abs().max().item(), name
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9, name


def test_int8_decode_and_prefill_paths_agree() -> None:
    lin = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    q = Int8Linear(lin, dense_rows=4)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        small = torch.cat([q(x[i : i + 1]) for i in range(6)])  # int8 kernel
        big = q(x)  # dense bf16 copy
        exact = lin(x)
    assert (small.float() - exact.float()).abs().max().item() < 0.05
    assert (big.float() - exact.float()).abs().max().item() < 1e-2
