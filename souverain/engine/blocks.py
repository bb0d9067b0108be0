"""Paged KV block bookkeeping and prefix caching. Pure Python: block ids, no tensors.

Full blocks are named by a hash chained through their prefix (and a salt, so organisations never
share cached prompts: prefix-cache timing leaks them, CVE-2025-46570). A block whose last user
leaves keeps its contents and its name, parked in an LRU, until its slot is needed again.

Where the model computes prompt tokens and generated tokens differently (AMX: bf16 products for the one,
int8 for the other, souverain/model/quant.py; AMX and AVX-512 BF16: prompt tokens attend through
prefill.cpp, generated ones through the vector kernel, kv_cache.py's TileSplit), a block holding
generated tokens is named apart (`share_generated=False`): a later prompt that repeats them (the next
turn of a chat) computes them again as prompt tokens, so its result never depends on what earlier
requests left in the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from souverain.engine.request import Sequence

NULL_BLOCK = -1


def block_hash(parent: bytes | None, tokens: Seq[int], salt: str, prompt_tokens: int | None = None) -> bytes:
    """The name of a full block after `parent`; `prompt_tokens` (fewer than the block's tokens) marks one
    whose tokens from that index on were generated."""
    h = hashlib.sha256()
    h.update(parent or salt.encode("utf-8"))
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    if prompt_tokens is not None:
        h.update(b"generated from" + prompt_tokens.to_bytes(4, "little"))
    return h.digest()


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, share_generated: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.share_generated = share_generated
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # nothing worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; oldest first
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # -- single blocks --------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently used
            old = self.hash_of[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]
            self.hash_of[block] = None
        self.refs[block] = 1
        return block

    def _acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            self._evictable.pop(block, None)
        self.refs[block] += 1

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released twice"
        if self.refs[block] == 0:
            if self.hash_of[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # -- sequences ------------------------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        """Take the longest cached prefix of seq's tokens (full blocks; at least one token is
        left to compute, since its logits are needed)."""
        assert not seq.block_table and seq.num_computed == 0
        salt = seq.request.cache_salt
        tokens = seq.token_ids
        usable = (len(tokens) - 1) // self.block_size
        parent: bytes | None = None
        for i in range(usable):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size], salt)
            block = self.cached.get(h)
            if block is None:
                break
            self._acquire(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * self.block_size
        if seq.preemptions == 0:  # a recompute after preemption is not a new query
            self.stats.queries += len(tokens)
            self.stats.hits += seq.num_computed
            seq.cached_tokens = seq.num_computed

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's blocks cover `num_tokens` tokens; False (nothing taken) if the pool is short."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(max(0, need)):
            seq.block_table.append(self._take())
        return True

    def free(self, seq: Sequence) -> None:
        """Give back all of seq's blocks, the last first (so a prefix outlives its tail in the LRU)."""
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._release(block)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed = 0

    def commit(self, seq: Sequence) -> None:
        """Name the blocks seq has filled since the last call, so later requests can reuse them."""
        full = seq.num_computed // self.block_size
        salt = seq.request.cache_salt
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            prompt = seq.prompt_len - i * self.block_size
            mark = None if self.share_generated or prompt >= self.block_size else max(0, prompt)
            h = block_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size], salt, mark)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if block != NULL_BLOCK and h not in self.cached and self.hash_of[block] is None:
                self.cached[h] = block
                self.hash_of[block] = h

    def release_outside_window(self, seq: Sequence, first_query: int, window: int) -> None:
        """Drop blocks no query from `first_query` on can see (all positions < first_query - window + 1)."""
        lowest_visible = first_query - window + 1
        for i in range(min(lowest_visible // self.block_size, len(seq.block_table))):
            block = seq.block_table[i]
            if block != NULL_BLOCK:
                self._release(block)
                seq.block_table[i] = NULL_BLOCK
