"""Paged KV tensors, and the per-step view the model's attention reads through.

The cache is one [slots, Hkv, hd] tensor per layer for K and for V (slots = blocks x block_size).
Each step the runner builds a PagedStep: where this step's tokens are written, and which keys each
query reads -- for the C++ kernels one kind for every query (`RowKeys`: its block table and key
range), for PyTorch groups of sequences (decodes; prefill chunks) with the slots to gather as keys,
padded, and a mask. The metadata is built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch

from souverain import kernels
from souverain.model.attention import attend_exact, window_mask


class PagedKVCache:
    """`k_transposed` stores keys as [layers, blocks, Hkv, hd, block_size], the layout the C++ decode
    kernel reads (a block's keys for a head one contiguous tile, transposed); values, and keys
    otherwise, are [layers, slots, Hkv, hd]. `ops`: the backend's C++ kernels that steps attend with
    (None: PyTorch); `tiles`: prompt tokens' queries attend through prefill_attention_cached on that isa's
    products (1024: AMX tiles, 512: AVX-512 BF16) and generated tokens' through paged_decode_attention (each
    token always one way: see `TileSplit`); 0: every query through paged_decode_attention.

    `int8_values` (bf16 caches with `ops`): store_kv also writes each slot's values rounded to int8 with a scale
    per slot and head (`v8` [layers, slots, Hkv, hd], `v_scale` [layers, slots, Hkv] fp32), and
    paged_decode_attention reads those instead of `v`: half the bytes of its read, which bounds a decode step of
    many streams. The rounding costs no measurable accuracy (SmolLM2's mean KL to fp32 0.0026 against 0.0028 for
    bf16 values: bench/accuracy.py --kv int8-v). Each token still attends one way whatever its step holds:
    prompt rows on `tiles` read `v`, every row of paged_decode_attention `v8`."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", k_transposed: bool = False,
                 ops: ModuleType | None = None, tiles: int = 0, int8_values: bool = False) -> None:
        slots = num_blocks * block_size
        shape = (n_layers, slots, n_kv_heads, head_dim)
        k_shape = (n_layers, num_blocks, n_kv_heads, head_dim, block_size) if k_transposed else shape
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if int8_values and (ops is None or dtype != torch.bfloat16 or not k_transposed):
            raise ValueError("int8 values need the C++ kernels, a bfloat16 cache and transposed keys")
        self.v8 = torch.zeros(shape, dtype=torch.int8, device=device) if int8_values else None
        self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device) if int8_values else None
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k_transposed = k_transposed
        self.ops, self.tiles = ops, tiles

    @staticmethod
    def blocks_for_memory(memory_bytes: int, n_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                          dtype: torch.dtype, int8_values: bool = False) -> int:
        heads = n_layers * block_size * n_kv_heads
        per_block = 2 * heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        if int8_values:
            per_block += heads * (head_dim + 4)  # the int8 copy and its fp32 scales
        return memory_bytes // per_block

    def values(self, layer: int) -> dict[str, torch.Tensor]:
        """The int8 copy's keyword arguments for store_kv and paged_decode_attention (none without one)."""
        if self.v8 is None or self.v_scale is None:
            return {}
        return {"v_int8": self.v8[layer], "v_scale": self.v_scale[layer]}


@dataclass
class RowKeys:
    """What the C++ attention reads for the query rows of a step, prefill and decode alike: each row's
    block table (int32 [N, W]) and the key positions it attends, [lo, hi) (int32 [N]); and per sequence,
    for prefill_attention_cached, (first row, keys before it, rows) and its block table (int32 [G, W]); `runs`: the
    (first row, rows) of the sequences with more than one row, which the vector kernel computes together."""

    tables: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    spans: list[tuple[int, int, int]]
    seq_tables: torch.Tensor
    runs: list[tuple[int, int]]
    split: TileSplit | None = None  # with a cache whose prompt rows take the tiles' products (`tiles`)


@dataclass
class TileSplit:
    """Which rows of a step attend through prefill_attention_cached (prompt tokens: on AMX tiles, or the
    same products on AVX-512 BF16) and which through the vector kernel (generated tokens). The tiles pay
    for packing a sequence's keys and values into their layout, once for all of a prompt chunk's rows but
    for each decoded token anew: at 32 streams of ~300 keys the packing took about a third of a decode
    step and the vector kernel, reading the cache in place, is ~1.7x faster than packing + tiles there
    (AMX). Each token is computed one way whatever shares its step
    (the two kernels round differently), as the int4 projections split the same rows (PromptRows).
    `spans`/`tables`: the prompt part of each sequence's rows, for prefill_attention_cached (None: no prompt
    row); `rows`: the generated rows (a slice, or indices where a recomputed sequence puts prompt rows
    between them; None: none) with their own RowKeys for paged_decode_attention (rows renumbered from 0)."""

    spans: list[tuple[int, int, int]]
    tables: torch.Tensor | None
    rows: slice | torch.Tensor | None
    keys: RowKeys | None

    @classmethod
    def of(cls, r: RowKeys, kinds: list[bool]) -> TileSplit:
        """From the step's RowKeys and each row's kind (True: a prompt token). A sequence's prompt rows
        come before its generated ones."""
        spans: list[tuple[int, int, int]] = []
        picks: list[int] = []
        generated: list[int] = []
        runs: list[tuple[int, int]] = []
        for i, (row, start, n) in enumerate(r.spans):
            prompt = sum(kinds[row : row + n])
            if prompt:
                spans.append((row, start, prompt))
                picks.append(i)
            if prompt < n:
                if n - prompt > 1:
                    runs.append((len(generated), n - prompt))
                generated += range(row + prompt, row + n)
        dev = r.lo.device
        tables = None if not picks else r.seq_tables if len(picks) == len(r.spans) else \
            r.seq_tables.index_select(0, torch.tensor(picks, device=dev))
        if not generated:
            return cls(spans, tables, None, None)
        first = generated[0]
        rows: slice | torch.Tensor = slice(first, first + len(generated)) \
            if generated == list(range(first, first + len(generated))) else torch.tensor(generated, device=dev)
        keys = RowKeys(r.tables[rows], r.lo[rows], r.hi[rows], [], r.seq_tables, runs)
        return cls(spans, tables, rows, keys)


@dataclass
class AttentionGroup:
    """Sequences the PyTorch path attends together: queries [G, T] (rows into the step's flat tokens),
    keys [G, S] gathered from the cache with a mask."""

    q_rows: torch.Tensor  # [G, T] flat row of each query (padding repeats a real row)
    k_blocks: torch.Tensor  # [G * B] the blocks whose slots are the keys, B per sequence
    num_keys: int  # S = B * block_size keys per sequence (beyond its own: masked)
    mask: torch.Tensor  # [G, 1, T, S]
    out_rows: torch.Tensor  # [V] flat rows of the real (unpadded) queries...
    out_picks: torch.Tensor  # [V] ...and where they sit in the group's flattened [G*T] output
    identity: bool = False  # one query per sequence, rows 0..N-1 in order: no gather/scatter
    # Chunks starting their sequences: causal over their own rows, no cached keys. Each chunk is one
    # run of the step's rows, (first row, rows) in `spans`; the tensors above are left empty.
    local: bool = False
    spans: list[tuple[int, int]] = field(default_factory=list)


class PagedStep:
    """A KVView over the paged cache for one engine step (tokens flattened into one row). With the C++
    kernels every query attends through one kernel (`rows`: each row's keys); else through PyTorch,
    in `groups`."""

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, groups: list[AttentionGroup],
                 rows: RowKeys | None = None) -> None:
        self.cache = cache
        self.slots = slots  # [N] where each token's k/v goes
        self.groups = groups
        self.rows = rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        flat_q = q[0]  # [N, H, hd]
        fast = kernels.usable(self.cache.ops, flat_q, kc) if self.cache.k_transposed else None
        v8 = self.cache.values(layer)
        if v8 and fast is None:
            raise RuntimeError("a cache with int8 values is written by the C++ kernels, which do not take "
                               f"{flat_q.dtype} tensors on {flat_q.device}")
        if fast is not None:
            fast.store_kv(kernels.rows_contiguous(k[0]), kernels.rows_contiguous(v[0]), kc, vc, self.slots, **v8)
        elif self.cache.k_transposed:
            bs = self.cache.block_size
            kc[self.slots // bs, :, :, self.slots % bs] = k[0]  # [N, Hkv, hd] into [blocks, Hkv, hd, bs]
            vc.index_copy_(0, self.slots, v[0])
        else:
            kc.index_copy_(0, self.slots, k[0])
            vc.index_copy_(0, self.slots, v[0])
        if self.rows is not None:
            # Every query, decode or prefill, from the cache (this step's keys stored above): a token's
            # result does not depend on how its sequence was chunked or what else is in the step.
            r = self.rows
            if fast is None:
                raise RuntimeError("this step's attention metadata is for the C++ kernels, which do not take "
                                   f"{flat_q.dtype} tensors on {flat_q.device}")
            bs, scale = self.cache.block_size, q.shape[-1] ** -0.5
            split = r.split
            every_row = split is not None and isinstance(split.rows, slice) and split.rows == slice(0, len(flat_q))
            if split is None or every_row:  # every row through the vector kernel
                keys = r if split is None else split.keys
                assert keys is not None
                return fast.paged_decode_attention(flat_q.contiguous(), kc, vc, keys.tables, keys.lo, keys.hi, bs,
                                                   scale, keys.runs, **v8)[None]
            out = torch.empty_like(flat_q)
            if split.tables is not None:
                fast.prefill_attention_cached(kernels.rows_contiguous(flat_q), kc, vc, out, split.spans, split.tables,
                                              bs, scale, self.cache.tiles)
            if split.keys is not None:
                gen = split.keys
                out[split.rows] = fast.paged_decode_attention(flat_q[split.rows].contiguous(), kc, vc, gen.tables,
                                                              gen.lo, gen.hi, bs, scale, gen.runs, **v8)
            return out[None]
        if len(self.groups) == 1 and self.groups[0].identity:  # all decodes: the common case
            g = self.groups[0]
            return attend_exact(flat_q[:, None], self._keys(kc, g), self._values(vc, g), g.mask).transpose(0, 1)
        out = torch.empty_like(flat_q)
        for g in self.groups:
            if g.local:
                # Each sequence's rows are one run of the step's rows: causal attention over that
                # slice, no padded copy gathered or scattered.
                for row, n in g.spans:
                    rows = slice(row, row + n)
                    out[rows] = attend_exact(flat_q[None, rows], k[:, rows], v[:, rows], None)[0]
                continue
            o = attend_exact(flat_q[g.q_rows], self._keys(kc, g), self._values(vc, g), g.mask)  # [G, T, H, hd]
            out.index_copy_(0, g.out_rows, o.flatten(0, 1).index_select(0, g.out_picks))
        return out[None]

    def _values(self, layer_cache: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """[G, S, Hkv, hd]: whole blocks copied at once (rows of block_size * Hkv * hd values)."""
        blocks = layer_cache.view(self.cache.num_blocks, -1).index_select(0, g.k_blocks)
        return blocks.view(-1, g.num_keys, *layer_cache.shape[1:])

    def _keys(self, layer_cache: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """[G, S, Hkv, hd], from either key layout."""
        if not self.cache.k_transposed:
            return self._values(layer_cache, g)
        _, hkv, hd, _ = layer_cache.shape
        blocks = layer_cache.index_select(0, g.k_blocks)  # [G*B, Hkv, hd, bs]
        return blocks.permute(0, 3, 1, 2).reshape(-1, g.num_keys, hkv, hd)


def build_group(starts: list[int], counts: list[int], row_offsets: list[int], block_tables: list[list[int]],
                block_size: int, window: int | None, device: torch.device, local: bool = False) -> AttentionGroup:
    """Attention metadata for sequences computing positions [start, start + count) this step.
    `local`: every start is 0 and the chunk fits the window, so the queries attend only among
    themselves (causal) and no cached keys are described."""
    if local:
        assert not any(starts) and (window is None or max(counts) <= window)
        nothing = torch.empty(0, dtype=torch.long, device=device)
        return AttentionGroup(nothing, nothing, 0, torch.empty(0, dtype=torch.bool, device=device), nothing, nothing,
                              local=True, spans=list(zip(row_offsets, counts, strict=True)))
    t = max(counts)
    start = torch.tensor(starts, device=device)
    count = torch.tensor(counts, device=device)
    ar_t = torch.arange(t, device=device)
    q_valid = ar_t[None] < count[:, None]  # [G, T]
    # Padding queries repeat the last real one, so no row of the mask is empty.
    q_off = torch.minimum(ar_t[None], (count - 1)[:, None])
    q_rows = torch.tensor(row_offsets, device=device)[:, None] + q_off
    q_pos = start[:, None] + q_off
    end = start + count
    # Keys: whole blocks, from the first one the window reaches to the one holding `end - 1`.
    k_start = (start - window + 1).clamp(min=0) if window else torch.zeros_like(start)
    first_block = k_start // block_size
    n_blocks = int(((end - 1) // block_size - first_block).max()) + 1
    ar_b = torch.arange(n_blocks, device=device)
    block_idx = first_block[:, None] + ar_b[None]  # [G, B]
    table = block_table_tensor(block_tables, device)
    width = table.shape[1]
    k_blocks = table.gather(1, block_idx.clamp(max=width - 1)).flatten()
    k_pos = (first_block * block_size)[:, None] + torch.arange(n_blocks * block_size, device=device)[None]
    k_pos = torch.where((k_pos >= k_start[:, None]) & (k_pos < end[:, None]), k_pos, torch.full_like(k_pos, -1))
    mask = window_mask(q_pos, k_pos, window)
    picks = q_valid.flatten().nonzero().squeeze(-1)
    identity = t == 1 and row_offsets == list(range(len(row_offsets)))
    return AttentionGroup(q_rows, k_blocks, n_blocks * block_size, mask, q_rows.flatten()[picks], picks, identity)


def block_table_tensor(block_tables: list[list[int]], device: torch.device, dtype: torch.dtype = torch.long
                       ) -> torch.Tensor:
    """[G, W] block tables, right-padded with block 0; blocks released by a sliding window (-1) read as 0."""
    width = max(len(b) for b in block_tables)
    return torch.tensor([[max(b, 0) for b in bt] + [0] * (width - len(bt)) for bt in block_tables], dtype=dtype,
                        device=device)


def row_keys(starts: list[int], counts: list[int], block_tables: list[list[int]], window: int | None,
             device: torch.device) -> RowKeys:
    """The keys of each query row of a step whose sequences compute positions [start, start + count)
    (rows in order, sequence after sequence): its sequence's keys [lo, hi), the window up to the row's
    own position."""
    seq_tables = block_table_tensor(block_tables, device, torch.int32)
    spans, row = [], 0
    for a, n in zip(starts, counts, strict=True):
        spans.append((row, a, n))
        row += n
    if row == len(counts):
        tables, pos = seq_tables, torch.tensor(starts, dtype=torch.int32, device=device)
    else:
        tables = seq_tables.repeat_interleave(torch.tensor(counts, device=device), dim=0)
        pos = torch.cat([torch.arange(a, a + n, dtype=torch.int32, device=device) for _, a, n in spans])
    lo = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
    return RowKeys(tables, lo, pos + 1, spans, seq_tables, [(row, n) for row, _, n in spans if n > 1])
