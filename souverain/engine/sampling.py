"""Sampling: small pure tensor functions over a batch of rows, each with its own parameters."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from souverain import kernels


@dataclass
class SamplingTensors:
    """Per-row parameters [R] (and, when any row uses penalties, token histories [R, V])."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 = off
    top_p: torch.Tensor
    min_p: torch.Tensor
    uniform: torch.Tensor  # one U(0,1) draw per row, from the row's own generator
    presence: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None  # [R, V] how often each token was generated
    seen: torch.Tensor | None = None  # [R, V] bool: in prompt or output (repetition penalty)
    # (rows, token ids): pairs not allowed yet (EOS and stop ids before min_tokens). A few per row, where an
    # [R, V] mask would cost a full pass and fresh pages every step.
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: torch.Tensor | None = None  # [R, V] added to the logits (logit_bias)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; HF/vLLM repetition penalty on
    prompt and generated tokens (positive logits divided, negative multiplied); OpenAI's logit_bias.
    (The bans are `ban`'s, in place.)"""
    if t.repetition is not None and t.seen is not None:
        r = t.repetition[:, None]
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(t.seen, penalised, logits)
    if t.output_counts is not None and t.presence is not None and t.frequency is not None:
        counts = t.output_counts
        logits = logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0).to(logits.dtype)
    if t.bias is not None:
        logits = logits + t.bias
    return logits


def ban(logits: torch.Tensor, banned: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The banned (row, token) pairs of `logits` set to -inf, in place."""
    return logits.index_put_(banned, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def apply_mask(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Constrained decoding, in place: rows[i] may only take the tokens allowed[i] [C, V] marks; other rows are
    untouched. (In place because fresh [R, V] tensors cost page faults each step: ~3 ms at 32 x 49k here.)"""
    forbidden = ~allowed.to(logits.device)
    if len(rows) == logits.shape[0]:  # every row constrained (rows are always in order)
        return logits.masked_fill_(forbidden, float("-inf"))
    full = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    full[rows.to(logits.device)] = forbidden
    return logits.masked_fill_(full, float("-inf"))


def sample(logits: torch.Tensor, t: SamplingTensors, ops: ModuleType | None = None) -> torch.Tensor:
    """logits [R, V] (penalties applied) -> token ids [R]. Temperature 0 rows are greedy. Logits may stay
    in bf16 where every row is greedy (argmax is exact in any dtype); sampling them wants float32.
    `ops`: the backend's C++ kernels (a one-pass argmax), or None."""
    greedy = t.temperature == 0
    if bool(greedy.all()):
        fast = kernels.usable(ops, logits)
        return fast.argmax_rows(logits.contiguous()) if fast is not None else logits.argmax(-1)
    temp = torch.where(greedy, torch.ones_like(t.temperature), t.temperature)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    if bool(((t.top_k > 0) | (t.top_p < 1) | (t.min_p > 0)).any()):
        probs, order = probs.sort(dim=-1, descending=True)
        probs = _truncate(probs, t)
    else:
        order = None
    # Inverse CDF with the row's own uniform draw: reproducible whatever else is in the batch.
    cdf = probs.cumsum(-1)
    target = t.uniform[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target).clamp(max=probs.shape[-1] - 1).squeeze(-1)
    tokens = choice if order is None else order.gather(1, choice[:, None]).squeeze(-1)
    return torch.where(greedy, logits.argmax(-1), tokens)


def _truncate(sorted_probs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Zero what top-k, top-p (nucleus) and min-p exclude; the best token always stays."""
    ranks = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)[None]
    k = torch.where(t.top_k > 0, t.top_k, torch.full_like(t.top_k, sorted_probs.shape[-1]))
    keep = ranks < k[:, None]
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the better tokens
    keep &= before < t.top_p[:, None]
    keep &= sorted_probs >= t.min_p[:, None] * sorted_probs[:, :1]
    keep[:, 0] = True
    return sorted_probs * keep


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (raw logits, before sampling controls): of the chosen tokens
    [R], and the top-k alternatives (values, ids) [R, k]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(-1)
    top = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top[0], top[1]
