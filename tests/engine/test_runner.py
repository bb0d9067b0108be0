"""ModelRunner.sample on logits made to order: min_tokens bans, grammar masks and log-probabilities together."""

from __future__ import annotations

import math

import pytest
import torch

from souverain.engine.request import Request, SamplingParams, Sequence
from tests.engine.toy import EOS, make_engine, tiny_model

A, B = 65, 66


def seq(i: int, **params: object) -> Sequence:
    settings: dict[str, object] = {"temperature": 0.0, "max_tokens": 8, **params}
    return Sequence(i, Request(f"r{i}", [1, 2, 3], SamplingParams(**settings)), 0, [1, 2, 3])  # type: ignore[arg-type]


def logits(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """EOS first, then A, then B; every other token impossible (so a sampled row can only take these three)."""
    x = torch.full((rows, 258), float("-inf"), dtype=dtype)
    x[:, EOS], x[:, A], x[:, B] = 2.0, 1.5, 1.0
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_min_tokens_bans_the_end_in_short_rows_only(dtype: torch.dtype) -> None:
    runner = make_engine(tiny_model("dense")).runner
    seqs = [seq(0, min_tokens=2), seq(1), seq(2, min_tokens=2, logprobs=2), seq(3, min_tokens=2, temperature=0.8),
            seq(4, min_tokens=2, stop_token_ids=(A,)), seq(5, min_tokens=2, ignore_eos=True)]
    done = seq(6, min_tokens=1)
    done.token_ids.append(A)  # one token out already: nothing banned any more
    seqs.append(done)
    # Row 3 samples: its draw of 0.99 falls on EOS, the last of the three by id, unless EOS is banned.
    got = runner.sample(logits(len(seqs), dtype), seqs, [0.0, 0.0, 0.0, 0.99, 0.0, 0.0, 0.0])
    assert got.tokens == [A, EOS, A, B, B, A, EOS]
    # Log-probabilities are the model's, before the ban: EOS stays the best alternative.
    chosen, top = got.logprobs[2]  # type: ignore[misc]
    norm = math.log(math.exp(2.0) + math.exp(1.5) + math.exp(1.0))
    assert chosen == pytest.approx(1.5 - norm, abs=1e-5)
    assert [t for t, _ in top] == [EOS, A]


def test_a_grammar_that_allows_only_the_end_overrules_min_tokens() -> None:
    runner = make_engine(tiny_model("dense")).runner
    seqs = [seq(0, min_tokens=4), seq(1, min_tokens=4), seq(2, min_tokens=4)]
    allowed = torch.zeros(2, 258, dtype=torch.bool)
    allowed[0, EOS] = True  # row 0: the grammar is complete
    allowed[1, [EOS, B]] = True  # row 1: it may still go on
    got = runner.sample(logits(3, torch.bfloat16), seqs, [0.0] * 3, (torch.tensor([0, 1]), allowed))
    assert got.tokens == [EOS, B, A]
