"""The real packaged SmolLM2-135M-Instruct (GGUF Q4_1) against transformers loading the same file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from souverain import kernels, load_model, load_tokenizer
from souverain.engine.simple import generate_tokens
from souverain.kernels.backend import available, choose

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived",
    "Les fromages français les plus connus sont",
    "1, 1, 2, 3, 5, 8,",
]


@pytest.fixture(scope="module")
def ours(smollm2_path: Path):
    return load_model(smollm2_path), load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def reference(smollm2_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


def test_logits_match_transformers(ours, reference) -> None:
    model, tok = ours
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            diff = (model(ids) - reference(ids).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def test_greedy_continuations_identical(ours, reference) -> None:
    model, tok = ours
    for prompt in PROMPTS[:3]:
        ids = tok.encode(prompt)
        got = list(generate_tokens(model, ids, max_tokens=32))
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(ids):].tolist(), prompt


def test_chat_answer_names_paris(ours) -> None:
    model, tok = ours
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = list(generate_tokens(model, ids, max_tokens=40, stop_ids=tok.eos_ids))
    assert "Paris" in tok.decode(out)


def test_cli_generate_names_paris(smollm2_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "souverain", "generate", str(smollm2_path),
                           "The capital of France is", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The capital of France is")
    assert "Paris" in done.stdout[len("The capital of France is"):]


def test_cli_generate_bad_model_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    done = subprocess.run([sys.executable, "-m", "souverain", "generate", str(bad), "hi"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "model.gguf" in done.stderr and "Traceback" not in done.stderr


def test_engine_batch_matches_alone(ours) -> None:
    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.engine.request import Request, SamplingParams

    model, tok = ours
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=64 << 20, max_batched_tokens=64), backend=choose())
    questions = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea, in French."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=24)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"q{i}", p, params))
    texts: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            texts[d.request_id] = texts.get(d.request_id, "") + d.text
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
    for i, p in enumerate(prompts):
        expected = list(generate_tokens(model, p, max_tokens=24, stop_ids=tok.eos_ids))
        assert tokens[f"q{i}"] == expected
        assert texts[f"q{i}"] == tok.decode(expected)
    assert "Paris" in texts["q0"]


@pytest.mark.parametrize("name", available(kernels.load()))
def test_served_int4_model_on_each_backend(smollm2_path: Path, name: str, ours) -> None:
    """SmolLM2 as `serve` runs it (bf16, int4 weights, int8 output projection), packed for each backend this
    machine runs: its next-token distributions stay close to the fp32 model's, and the engine serves four
    prompts at once on it. (Token-for-token equality of batched and alone is the batch-invariance issue's:
    attention still takes other paths by chunking here.)"""
    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.engine.request import Request, SamplingParams
    from souverain.model.quant import prepare, quantize

    backend = choose(name=name)
    model = prepare(quantize(load_model(smollm2_path, dtype=torch.bfloat16), bits=4), backend)
    tok = load_tokenizer(smollm2_path)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=64 << 20, max_batched_tokens=48), backend=backend)
    questions = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea.", "2 + 2 ="]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=20)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"q{i}", p, params))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
    # Measured KL to the fp32 model (bench/accuracy.py, six prompts): 0.0028 on amx/avx512/avx2 (activations
    # read to 11 bits per 32 values), 0.0031 on torch (bf16 activations); 0.0047 with 8-bit int8 blocks.
    reference, _ = ours
    with torch.inference_mode():
        for p in prompts:
            want = reference(torch.tensor([p]))[0].float().log_softmax(-1)
            got = model(torch.tensor([p]))[0].float().log_softmax(-1)
            kl = torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1)
            assert kl.mean() < 0.03 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.85
    # Every stream got its 20 tokens (or an end): the engine ran them together on the backend's kernels.
    assert all(0 < len(t) <= 20 for t in tokens.values()) and len(tokens) == len(prompts)
