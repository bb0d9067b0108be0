"""The per-step attention metadata the C++ kernels read (souverain/engine/kv_cache.py)."""

from __future__ import annotations

import torch

from souverain.engine.kv_cache import TileSplit, row_keys

TABLES = [[3, 4], [7], [1, 2], [5, 6]]


def keys(starts: list[int], counts: list[int]):  # type: ignore[no-untyped-def]
    return row_keys(starts, counts, TABLES[: len(starts)], None, torch.device("cpu"))


def test_prompt_rows_go_to_the_tiles_and_generated_rows_to_the_vector_kernel() -> None:
    # A prompt chunk (rows 0-9), a recomputed sequence (rows 10-15: 4 prompt tokens, 2 generated), two decodes.
    r = keys([0, 0, 20, 9], [10, 6, 1, 1])
    s = TileSplit.of(r, [True] * 14 + [False] * 4)
    assert s.spans == [(0, 0, 10), (10, 0, 4)]
    assert s.tables is not None and s.tables.tolist() == r.seq_tables[:2].tolist()
    assert s.rows == slice(14, 18) and s.keys is not None
    assert s.keys.runs == [(0, 2)]  # the recomputed sequence's two generated rows, renumbered
    assert s.keys.hi.tolist() == [5, 6, 21, 10] and s.keys.tables.tolist() == r.tables[14:].tolist()


def test_generated_rows_between_prompt_rows_are_picked_by_index() -> None:
    # Two recomputed sequences: each has prompt rows then generated rows, so the generated rows are not one run.
    r = keys([0, 0], [5, 4])
    s = TileSplit.of(r, [True, True, True, False, False, True, False, False, False])
    assert s.spans == [(0, 0, 3), (5, 0, 1)]
    assert isinstance(s.rows, torch.Tensor) and s.rows.tolist() == [3, 4, 6, 7, 8]
    assert s.keys is not None and s.keys.runs == [(0, 2), (2, 3)]
    assert s.keys.lo.tolist() == [0] * 5 and s.keys.hi.tolist() == [4, 5, 2, 3, 4]


def test_a_step_of_one_kind() -> None:
    r = keys([0, 30], [8, 2])
    prompt = TileSplit.of(r, [True] * 10)
    assert prompt.rows is None and prompt.keys is None and prompt.spans == r.spans and prompt.tables is r.seq_tables
    r = keys([12, 30, 4], [1, 1, 1])
    decode = TileSplit.of(r, [False] * 3)
    assert decode.spans == [] and decode.tables is None and decode.rows == slice(0, 3)
    assert decode.keys is not None and decode.keys.runs == [] and decode.keys.hi.tolist() == [13, 31, 5]
