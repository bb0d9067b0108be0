"""The same model on a CUDA device: loads there, matches the CPU, caches correctly, runs bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from souverain.model import ContiguousKV
from souverain.weights import load_model
from tests.model.test_cache import ARGS, random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", list(ARGS))
def test_cuda_matches_cpu_and_cache(name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = random_model(ARGS[name])
    tokens = torch.randint(0, 200, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = cpu(tokens)
        gpu = random_model(ARGS[name]).cuda()
        full = gpu(tokens.cuda())
        assert (full.cpu() - expected).abs().max().item() <= 1e-3
        kv = ContiguousKV.for_model(gpu, 2, 64)
        outs = []
        for a, b in [(0, 11)] + [(i, i + 1) for i in range(11, 30)]:
            outs.append(gpu(tokens[:, a:b].cuda(), torch.arange(a, b, device="cuda").expand(2, b - a), kv))
        assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4
        bf16 = random_model(ARGS[name]).to("cuda", torch.bfloat16)(tokens.cuda()).float().cpu()
        assert (bf16.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.8


def test_load_model_onto_cuda(tmp_path: Path) -> None:
    from tests.writers import build_hf

    ref = build_hf("mixtral", tmp_path, num_local_experts=4, num_experts_per_tok=2)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    model = load_model(tmp_path, device="cuda")
    assert next(model.parameters()).is_cuda
    with torch.no_grad():
        diff = (model(tokens.cuda()).cpu() - ref(tokens).logits).abs().max().item()
    assert diff <= 1e-3
