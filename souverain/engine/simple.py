"""Batch-1 generation with a contiguous KV cache: the reference loop the batched engine must match."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from souverain.engine.sampling import SamplingTensors, sample
from souverain.model.kv import ContiguousKV
from souverain.model.transformer import Transformer


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits [V] with the engine's sampling functions: greedy at temperature 0."""
    if temperature <= 0:
        return int(logits.argmax())
    one = torch.tensor
    params = SamplingTensors(temperature=one([temperature]), top_k=one([0]), top_p=one([top_p]), min_p=one([0.0]),
                             uniform=torch.rand(1, generator=generator))
    return int(sample(logits.float()[None], params)[0])


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt: list[int], *, max_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, stop_ids: Iterable[int] = (), seed: int | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` new tokens; a stop id is yielded, then generation ends."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    stop = set(stop_ids)
    limit = min(len(prompt) + max_tokens, model.args.max_seq_len)
    device = next(model.parameters()).device
    kv = ContiguousKV.for_model(model, 1, limit)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    for _ in range(limit - len(prompt)):
        logits = model(tokens, positions, kv)[0, -1]
        token = sample_one(logits, temperature, top_p, generator)
        yield token
        if token in stop:
            return
        positions = positions[:, -1:] + 1
        tokens = torch.tensor([[token]], device=device)
