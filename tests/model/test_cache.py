"""Incremental decoding through the KV cache must give the full-sequence logits."""

from __future__ import annotations

import pytest
import torch

from souverain.model import ContiguousKV, ModelArgs, MoeArgs, Transformer

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=200, max_seq_len=64)
ARGS = {
    "dense": ModelArgs(**BASE),
    "sliding_window": ModelArgs(**BASE, sliding_window=6),
    "moe": ModelArgs(**BASE, moe=MoeArgs(num_experts=8, num_experts_per_tok=2)),
    "tied": ModelArgs(**BASE, tie_embeddings=True),
}


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    return model.eval()


@pytest.mark.parametrize("name", list(ARGS))
def test_incremental_equals_full(name: str) -> None:
    model = random_model(ARGS[name])
    tokens = torch.randint(0, 200, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        kv = ContiguousKV.for_model(model, 2, 64)
        # A prefill, a chunk (as chunked prefill would send), then one token at a time.
        pieces = [(0, 11), (11, 16)] + [(i, i + 1) for i in range(16, 30)]
        outs = []
        for a, b in pieces:
            positions = torch.arange(a, b).expand(2, b - a)
            outs.append(model(tokens[:, a:b], positions, kv))
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-4


def test_sliding_window_limits_attention() -> None:
    # With a window of 6, the last logits cannot depend on a token 11 positions back.
    model = random_model(ARGS["sliding_window"])
    tokens = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(4))
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 200
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # Layers stack: 2 layers widen the reach to 2 * (6 - 1) positions, so 19 does not see 8.
    assert torch.equal(a[0, 19], b[0, 19])
    assert not torch.equal(a[0, 12], b[0, 12])


def test_moe_routes_each_token_to_top_k() -> None:
    model = random_model(ARGS["moe"])
    moe = model.layers[0].feed_forward
    x = torch.randn(5, 64)
    # Reference by hand, token by token: softmax over the chosen experts' logits.
    expected = torch.zeros_like(x)
    logits = moe.gate(x)
    for i in range(5):
        top = torch.topk(logits[i], 2)
        weights = torch.softmax(top.values, -1)
        for w, e in zip(weights, top.indices, strict=True):
            h = torch.nn.functional.silu(x[i] @ moe.w1[e].T) * (x[i] @ moe.w3[e].T)
            expected[i] += w * (h @ moe.w2[e].T)
    with torch.no_grad():
        assert (moe(x) - expected).abs().max().item() <= 1e-5
