from __future__ import annotations

import pytest

from souverain.weights.names import Target, gguf_name, hf_name, mistral_name


def test_hf_names() -> None:
    assert hf_name("model.layers.3.self_attn.q_proj.weight") == Target("layers.3.attention.wq.weight")
    assert hf_name("model.layers.0.mlp.gate_proj.weight") == Target("layers.0.feed_forward.w1.weight")
    assert hf_name("model.layers.1.block_sparse_moe.experts.7.w2.weight") == Target("layers.1.feed_forward.w2", 7)
    assert hf_name("model.layers.1.block_sparse_moe.gate.weight") == Target("layers.1.feed_forward.gate.weight")
    assert hf_name("lm_head.weight") == Target("output.weight")
    assert hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        hf_name("model.layers.0.vision_tower.weight")


def test_mistral_names() -> None:
    assert mistral_name("layers.2.attention.wk.weight") == Target("layers.2.attention.wk.weight")
    assert mistral_name("layers.2.feed_forward.experts.3.w1.weight") == Target("layers.2.feed_forward.w1", 3)
    with pytest.raises(KeyError):
        mistral_name("vision_encoder.weight")


def test_gguf_names() -> None:
    assert gguf_name("blk.5.attn_output.weight") == Target("layers.5.attention.wo.weight")
    assert gguf_name("blk.5.ffn_gate_exps.weight") == Target("layers.5.feed_forward.w1")
    assert gguf_name("blk.5.ffn_up.2.weight") == Target("layers.5.feed_forward.w3", 2)
    assert gguf_name("token_embd.weight") == Target("tok_embeddings.weight")
    assert gguf_name("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        gguf_name("blk.0.ssm_conv1d.weight")
