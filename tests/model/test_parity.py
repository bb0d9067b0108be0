"""Our Transformer against HF transformers on the same random weights, from every format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from souverain.weights import load_model
from tests.writers import build_hf, our_state, quantize_roundtrip, write_gguf, write_mistral

CASES = {
    # A window of 8 over 24-token prompts: most queries see only part of their past.
    "mistral": ("mistral", dict(sliding_window=8)),
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=16),
                                 rope_theta=500000.0)),
}
TOL = 1e-4


def assert_matches(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Within TOL plus a few float32 steps of the logits' scale: the large logits of random weights
    (hundreds) differ in their last bits when a sum is added in another order (our C++ RMSNorm, for one)."""
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= TOL + 4e-6 * scale


def prompts() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 24), generator=g)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory):
    """Each case's transformers model, saved once per module, built on first use."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            kind, overrides = CASES[name]
            folder = tmp_path_factory.mktemp(name)
            model = build_hf(kind, folder, **overrides)
            with torch.no_grad():
                built[name] = (name, folder, model, model(prompts()).logits)
        return built[name]

    return get


@pytest.fixture(params=list(CASES))
def reference(request: pytest.FixtureRequest, references):
    return references(request.param)


def _ours(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path)(prompts())


def test_hf_layout_matches_transformers(reference) -> None:
    _, folder, _, expected = reference
    assert_matches(_ours(folder), expected)


def test_hf_sharded_layout(reference, tmp_path: Path) -> None:
    _, _, model, expected = reference
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_matches(_ours(tmp_path), expected)


@pytest.mark.parametrize("name", ["mistral", "mixtral"])  # params.json has no Llama 3 rope scaling
def test_mistral_layout_matches(references, name: str, tmp_path: Path) -> None:
    _, folder, _, expected = references(name)
    args, state = our_state(folder)
    write_mistral(args, state, tmp_path)
    assert_matches(_ours(tmp_path), expected)


def test_gguf_f32_matches(reference, tmp_path: Path) -> None:
    _, folder, _, expected = reference
    args, state = our_state(folder)
    write_gguf(args, state, tmp_path / "m.gguf")
    assert_matches(_ours(tmp_path / "m.gguf"), expected)


# Q8_0 on every architecture; the other types on one.
QUANT_CASES = [(name, "Q8_0") for name in CASES] + [("mistral", q) for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16",
                                                                             "BF16")]


@pytest.mark.parametrize(("name", "qtype"), QUANT_CASES)
def test_gguf_quantised_matches_dequantised_reference(references, name: str, qtype: str, tmp_path: Path) -> None:
    _, folder, model, _ = references(name)
    quant = GGMLQuantizationType[qtype]
    args, state = our_state(folder)
    write_gguf(args, state, tmp_path / "q.gguf", quant)
    # The reference: transformers with every matrix replaced by its round trip through `qtype`.
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(quantize_roundtrip(p.reshape(-1, p.shape[-1]), quant).reshape(p.shape))
        expected = model(prompts()).logits
    assert_matches(_ours(tmp_path / "q.gguf"), expected)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quants_match_transformers_reading_the_same_file(tmp_path: Path, qtype: str) -> None:
    """k-quant blocks hold 256 values, so these use wider matrices (hidden 256, MLP 512). The
    reference is transformers loading the very same GGUF file."""
    import transformers

    folder = tmp_path / "hf"
    build_hf("llama", folder, hidden_size=256, intermediate_size=512)
    args, state = our_state(folder)
    write_gguf(args, state, tmp_path / "k.gguf", GGMLQuantizationType[qtype])
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(prompts()).logits
    assert_matches(_ours(tmp_path / "k.gguf"), expected)
