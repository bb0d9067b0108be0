"""Mixtral-shaped decode through Souverain's engine vs HF transformers, and vs a dense model of equal
active parameters (a benchmark, not a test).

Run: .venv/bin/python bench/moe.py [--new 64] [--rounds 2]

A tiny random Mixtral (hidden 512, 8 layers, 8 experts top-2, GQA 8:2) written by transformers as
safetensors and loaded by Souverain's loader; the dense model has the same layers with one feed-forward
of twice an expert's width (the same active parameters per token). bf16; Souverain's weights int4 (the
experts' too) unless --bits 0; 2 threads, in this process. Decode tok/s at batch 1 and 8: generated
tokens over the time from the first generated token to the last (HF: `generate` with min_new_tokens, the
prefill timed separately and taken off). Prints each round and the ratios. OMP_WAIT_POLICY is PASSIVE, as
`serve` runs (see below).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# As `souverain serve` and `run` set it: OpenMP threads that spin after each region take the cores from the
# kernels' pool (the C++ decoder's MoE ran 50 tok/s at batch 1 without it, 388 with it). HF transformers
# runs faster with spinning threads: `OMP_WAIT_POLICY=ACTIVE .venv/bin/python bench/moe.py` shows its best.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `serve` sets it: huge pages for the weights and KV cache

import torch

HIDDEN, LAYERS, EXPERTS, TOP, FF, VOCAB = 512, 8, 8, 2, 1536, 32000


def write_models(where: Path) -> tuple[Path, Path]:
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=FF, num_local_experts=EXPERTS,
                                           num_experts_per_tok=TOP)).to(torch.bfloat16)
    dense = MistralForCausalLM(MistralConfig(**common, intermediate_size=FF * TOP)).to(torch.bfloat16)
    for model, name in ((moe, "moe"), (dense, "dense")):
        model.save_pretrained(where / name)
    return where / "moe", where / "dense"


def active_params(path: Path) -> tuple[float, float]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    attn = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // 4))
    experts = getattr(c, "num_local_experts", 1)
    ff = 3 * HIDDEN * c.intermediate_size
    total = attn + LAYERS * ff * experts + 2 * VOCAB * HIDDEN
    active = attn + LAYERS * ff * min(experts, getattr(c, "num_experts_per_tok", 1)) + 2 * VOCAB * HIDDEN
    return total / 1e6, active / 1e6


def ours(path: Path, batch: int, new: int, bits: int) -> float:
    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.engine.request import Request, SamplingParams
    from souverain.kernels.backend import choose
    from souverain.model.quant import prepare
    from souverain.weights import load_model
    from tests.engine.toy import ByteTokenizer

    backend = choose()
    model = prepare(load_model(path, dtype=torch.bfloat16, bits=bits), backend)
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(kv_cache_memory=256 << 20), backend=backend)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i in range(batch):
        engine.add_request(Request(f"r{i}", [1 + (7 * i + j) % 250 for j in range(16)], params))
    first = None
    count = 0
    while engine.has_unfinished():
        for d in engine.step():
            count += len(d.token_ids)
        if first is None and count:
            first, count = time.perf_counter(), 0  # after the prefill step (its tokens not counted)
    assert first is not None
    return count / (time.perf_counter() - first)


def hf(path: Path, batch: int, new: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([[1 + (7 * i + j) % 250 for j in range(16)] for i in range(batch)])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        took = time.perf_counter() - start - prefill
    return batch * (new - 1) / took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4, help="Souverain's weights: 4 (int4, experts too; default) or 0")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        moe, dense = write_models(Path(tmp))
        for path, name in ((moe, "moe"), (dense, "dense")):
            total, act = active_params(path)
            print(f"{name}: {total:.0f}M parameters, {act:.0f}M active per token")
        for r in range(a.rounds):
            for batch in (1, 8):
                for label, fn in (("souverain moe", lambda b: ours(moe, b, a.new, a.bits)),
                                  ("souverain dense", lambda b: ours(dense, b, a.new, a.bits)),
                                  ("hf moe bf16", lambda b: hf(moe, b, a.new, torch.bfloat16)),
                                  ("hf moe fp32", lambda b: hf(moe, b, a.new, torch.float32))):
                    got = fn(batch)
                    rows.setdefault(f"{label} b{batch}", []).append(got)
                    print(f"round {r + 1} {label:>16} batch {batch}: {got:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print("\n| | batch 1 tok/s | batch 8 tok/s |\n|---|---|---|")
    for label in ("souverain moe", "souverain dense", "hf moe bf16", "hf moe fp32"):
        print(f"| {label} | {med[label + ' b1']:.1f} | {med[label + ' b8']:.1f} |")
    for b in (1, 8):
        best_hf = max(med[f"hf moe bf16 b{b}"], med[f"hf moe fp32 b{b}"])
        print(f"batch {b}: Souverain MoE / best HF MoE {med[f'souverain moe b{b}'] / best_hf:.2f}x; "
              f"Souverain dense / Souverain MoE {med[f'souverain dense b{b}'] / med[f'souverain moe b{b}']:.2f}x")


if __name__ == "__main__":
    main()
