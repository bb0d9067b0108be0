"""Block pool and prefix cache bookkeeping: pure Python, milliseconds."""

from __future__ import annotations

import subprocess
import sys

from souverain.engine.blocks import NULL_BLOCK, BlockManager
from souverain.engine.request import Request, Sequence


def seq(tokens: list[int], salt: str = "", seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, Request(f"r{seq_id}", tokens, cache_salt=salt), 0, list(tokens))


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    assert bm.grow(s, len(s.token_ids))
    s.num_computed = len(s.token_ids)
    bm.commit(s)
    return s


def test_prefix_reuse_and_refcounts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, seq(list(range(10))))  # 2 full blocks + 1 partial
    b = seq([*range(8), 99, 98, 97], seq_id=1)
    bm.admit(b)
    assert b.block_table == a.block_table[:2] and b.num_computed == 8
    assert bm.refs[a.block_table[0]] == 2
    bm.free(a)
    assert bm.refs[b.block_table[0]] == 1 and bm.num_free == 8 - 2


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, seq(list(range(8))))
    again = seq(list(range(8)), seq_id=1)
    bm.admit(again)
    assert again.num_computed == 4  # the last block is recomputed for its logits


def test_lru_eviction_keeps_recent_prefixes() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    old = computed(bm, seq([1, 2, 3, 4]))
    new = computed(bm, seq([5, 6, 7, 8], seq_id=1))
    bm.free(old)
    bm.free(new)  # both cached and evictable; `old` is least recently used
    taker = seq([9, 9, 9, 9], seq_id=2)
    assert bm.grow(taker, 4)  # takes the two oldest cached blocks
    probe_old, probe_new = seq([1, 2, 3, 4, 0], seq_id=3), seq([5, 6, 7, 8, 0], seq_id=4)
    bm.admit(probe_old)
    bm.admit(probe_new)
    assert probe_old.num_computed == 0 and probe_new.num_computed == 4


def test_salt_isolates_tenants() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, seq(list(range(9)), salt="org-a"))
    other = seq(list(range(9)), salt="org-b", seq_id=1)
    bm.admit(other)
    assert other.num_computed == 0
    same = seq(list(range(9)), salt="org-a", seq_id=2)
    bm.admit(same)
    assert same.num_computed == 8


def test_generated_blocks_are_named_apart_where_prompts_compute_differently() -> None:
    """An answer's blocks serve a later prompt that repeats them (the next turn of a chat) only where the
    model computes prompt and generated tokens the same way (share_generated)."""
    for share in (True, False):
        bm = BlockManager(num_blocks=16, block_size=4, share_generated=share)
        first = seq(list(range(6)))  # a 6-token prompt, then 6 generated tokens
        first.token_ids += [50, 51, 52, 53, 54, 55]
        computed(bm, first)
        turn = seq([*range(6), 50, 51, 52, 53, 54, 55, 7, 8], seq_id=1)  # all of it a prompt now
        bm.admit(turn)
        # Block 0 is all prompt either way; blocks 1 and 2 hold generated tokens.
        assert turn.num_computed == (12 if share else 4)
    bm = BlockManager(num_blocks=16, block_size=4, share_generated=False)
    again = seq(list(range(12)), seq_id=2)
    computed(bm, again)  # a prompt's own blocks are shared as before
    probe = seq([*range(12), 1], seq_id=3)
    bm.admit(probe)
    assert probe.num_computed == 12


def test_window_release() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    s = computed(bm, seq(list(range(16))))
    bm.release_outside_window(s, first_query=16, window=6)  # keys >= 11 still visible
    assert s.block_table[:2] == [NULL_BLOCK, NULL_BLOCK] and NULL_BLOCK not in s.block_table[2:]
    bm.free(s)
    assert bm.num_free == 8


def test_grow_refuses_without_taking_anything() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(12)))
    assert not bm.grow(s, 12)
    assert s.block_table == [] and bm.num_free == 2


def test_scheduler_side_imports_no_torch() -> None:
    code = ("import sys; import souverain.engine.scheduler, souverain.engine.blocks, souverain.engine.request; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
