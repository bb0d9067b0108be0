"""The decode step's two big costs, kernel by kernel, on this CPU (a benchmark, not a test).

Run: .venv/bin/python bench/kernel_rows.py [--rounds 5]

1. The int4 products of one decode step of SmolLM2-135M's shapes (30 layers of wqkv 960 x 576, wo 576 x 576,
   w13 3072 x 576, w2 576 x 1536; random codes) for M rows: `q4_linear` on each instruction set this CPU runs
   (256 AVX2, 512 AVX-512 VNNI, 1024 AMX tiles above 4 rows; the same bits on all of them) and
   `q4_linear_bf16` (the prompt rows' product, 512 AVX-512 BF16 and 1024 AMX). ms per step, the median of
   the rounds, the instruction sets taking turns; and the weights' bytes over that time, to compare with a
   stream of reads (step 2's baseline).
2. `paged_decode_attention` for 32 sequences of 336 keys (the 32-stream benchmark's length: ~200 prompt + up
   to 128 generated), 30 layers, blocks in a random order: GB/s of KV read, against a plain sum over 1 GB of
   fp32 on 2 threads (this machine's stream of reads) in the same run.

Where these stand tells what a change can win: attention near the stream's rate gains only from fewer
bytes (a narrower KV cache); a product far below it is compute-bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of SmolLM2-135M's four products
LAYERS = 30


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def products(ops, rounds: int) -> None:
    from souverain.kernels import tiles

    torch.manual_seed(0)
    weights = [[tiles.pack_q4(torch.randint(0, 16, (n, k)), torch.randn(k // 32, n, 2) * 0.01) for n, k in SHAPES]
               for _ in range(LAYERS)]
    weight_bytes = sum(c.numel() + 2 * s.numel() for layer in weights for c, s in layer)
    kinds: list[tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]] = []
    for isa in (256, 512, 1024):
        if ops.q4_supported(isa):
            kinds.append((f"q4 {isa}", lambda x, c, s, isa=isa: ops.q4_linear(x, c, s, isa, False)))
    for isa in (512, 1024):
        if ops.bf16_supported(isa):
            kinds.append((f"bf16 {isa}", lambda x, c, s, isa=isa: ops.q4_linear_bf16(x, c, s, False, isa)))
    print(f"int4 products of one SmolLM2 step ({weight_bytes / 1e6:.0f} MB of codes and scales), ms (GB/s of weights):")
    print("rows | " + " | ".join(name for name, _ in kinds))
    for m in (1, 4, 8, 16, 32, 64):
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for _, k in SHAPES}
        times: dict[str, list[float]] = {name: [] for name, _ in kinds}
        for _ in range(rounds):
            for name, fn in kinds:
                def step(fn=fn, xs=xs) -> None:
                    for layer in weights:
                        for (_, k), (c, s) in zip(SHAPES, layer, strict=True):
                            fn(xs[k], c, s)
                times[name].append(median_ms(step, 3))
        cells = []
        for name, _ in kinds:
            ms = statistics.median(times[name])
            cells.append(f"{ms:.2f} ({weight_bytes / ms / 1e6:.1f})")
        print(f"{m} | " + " | ".join(cells))


def attention(ops, rounds: int) -> None:
    torch.manual_seed(0)
    n, heads, kv_heads, hd, bs, keys = 32, 9, 3, 64, 16, 336
    per = keys // bs
    blocks = n * per * LAYERS
    k_cache = torch.randn(blocks, kv_heads, hd, bs).to(torch.bfloat16)
    v_cache = torch.randn(blocks * bs, kv_heads, hd).to(torch.bfloat16)
    tables = [t.contiguous() for t in torch.randperm(blocks).view(LAYERS, n, per).int()]
    q = torch.randn(n, heads, hd).to(torch.bfloat16)
    lo, hi = torch.zeros(n, dtype=torch.int32), torch.full((n,), keys, dtype=torch.int32)
    kv_bytes = LAYERS * n * keys * kv_heads * hd * 2 * 2

    def step() -> None:
        for table in tables:
            ops.paged_decode_attention(q, k_cache, v_cache, table, lo, hi, bs, hd ** -0.5, [])

    big = torch.randn(256 * 1024 * 1024)  # 1 GB of fp32
    attend, stream = [], []
    for _ in range(rounds):
        attend.append(median_ms(step, 3))
        stream.append(median_ms(lambda: big.sum(), 3))
    a, s = statistics.median(attend), statistics.median(stream)
    rate, base = kv_bytes / a / 1e6, big.numel() * 4 / s / 1e6
    print(f"decode attention, 32 x {keys} keys x {LAYERS} layers ({kv_bytes / 1e6:.0f} MB of bf16 KV): {a:.2f} ms, "
          f"{rate:.1f} GB/s; a sum over 1 GB: {base:.1f} GB/s; attention at {rate / base:.2f}x the stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from souverain import kernels

    torch.set_num_threads(2)
    ops = kernels.load()
    if ops is None:
        sys.exit("the C++ kernels did not build here: nothing to measure")
    products(ops, args.rounds)
    attention(ops, args.rounds)


if __name__ == "__main__":
    main()
