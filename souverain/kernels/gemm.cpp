// bf16 matrix products on Intel AMX tiles, or AVX-512 BF16's vector units, for the engine's linears (built with
// cpu.cpp).
//
// oneDNN's matmul, behind `x @ w`, repacks the weight into AMX's layout on every call; at the
// engine's batch sizes (a few to a few hundred rows) that repacking, not the arithmetic, is most of
// the time. Here the weight is packed once (`pack_tiles` in souverain/kernels/tiles.py) and the
// product reads it straight into tiles, prefetching ahead. On a 2-core Sapphire Rapids VM, the 120
// layer products of SmolLM2 took 12-13 ms against oneDNN's 23-31 ms at 4-32 rows, ~1.2x less at 256
// and about the same at 1,024 (noisy machine; minimum of repeated runs).
//
// Layout of the packed weight w [N, K]: [N/32, K/32, 2, 16, 32] bf16. Block (n, k) holds two tiles
// (columns n*32 .. +16 and +16 .. +32), each 16 rows of K-pairs: row r, lane 2c + j is
// w[n*32 + h*16 + c, k*32 + 2r + j] (AMX's VNNI order). One output block of 32 rows x 32 columns
// keeps four fp32 accumulator tiles; each step over K loads two tiles of x and two of the weight.
//
// Products are summed in fp32 and rounded to bf16 once, as oneDNN does; only the order of the
// sums differs.
//
// With 32 rows of x and 32 columns of the weight per block, each tile product needs one tile
// (1 KB) loaded: faster than L2 delivers, so the block of x's rows (36 KB at K = 576) must stay in
// L1 while the weight's panels pass. Weight tiles read from L2 are therefore loaded with the
// non-temporal hint and not prefetched into L1: the 120 int4 products of SmolLM2 took 97 ms
// against 119 at 1,024 rows, 27 against 33 at 256, 11.4 against 12.7 at 64 (one process, the two
// forms interleaved, minima of 12 runs; same bits).
//
// `q4_linear_bf16` reads int4 weights instead, in q4_linear's layout (q4.cpp; the model keeps one copy
// of its codes for both products): each 32-column panel is dequantised into bf16 tiles in a per-thread
// buffer (in L1/L2), then multiplied as above; a panel then serves every 32-row block of x. Up to 32
// rows there is one block of rows, so each weight block is instead dequantised just ahead of its
// products into a small ring in L1 and the vector units overlap the tiles: the 120 products of
// SmolLM2 at 32 rows took 8.4-9.2 ms against 14-18 ms the panel way (two of three interleaved rounds;
// in the third both took ~18-19 ms). It is the engine's product for prompt tokens (souverain/model/
// quant.py). Each block's zero is multiplied separately (x's block sums, in two bf16 parts, against
// the zeros: K grows by 1/16), so the codes' steps survive the bf16 tiles: SmolLM2's mean KL to fp32 on
// prompt rows 0.0092 -> 0.0038 (bench/accuracy.py). Per product at 512 rows, against q4_linear's
// 11-bit int8 one: 0.92 ms against 1.55 (wqkv), 0.54/0.97 (wo), 2.97/4.70 (w13 with its swiglu),
// 1.35/2.24 (w2) (minima of 40 interleaved runs); at 1 row all 120 took 7.6 ms against 2.2, so
// generated tokens stay on q4_linear.
//
// Without AMX, on AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake), `q4_linear_bf16` with isa 512 multiplies the
// same dequantised panels with `vdpbf16ps` (`vector_product`): R = 12 rows of x against a panel's 32 columns
// with the 24 accumulators in registers over all of K. AMD EPYC Zen 4, 2 cores, SmolLM2's products against
// q4_linear's 11-bit int8 ones (minima of 15 interleaved runs): 512 rows 1.66/2.22 ms (wqkv), 0.98/1.35 (wo),
// 5.54/6.77 (w13 with its swiglu), 2.54/3.65 (w2); 128 rows 1.27-1.41x faster, 32 rows 1.11-1.21x, 12 rows
// 0.91-0.95x; the engine's prefill of a 1,000-token prompt 10-14% faster (about 75% of vdpbf16ps's peak).
//
// `glu`: for a fused [gate | up] weight (FeedForward.w13) both products return silu(gate) * up:
// each output block multiplies a gate panel and the matching up panel, then applies `swiglu`'s
// arithmetic (cpu.cpp; same roundings, same vector exp: the same bits) before writing, so the
// [gate | up] output is never written and read back. SmolLM2's 30 w13 products with their swiglu:
// 73.0 -> 68.4 ms at 1,024 rows, 7.56 -> 7.28 at 32 (one process alternating, minima of 25).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "amx.h"
#include "kernels.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#ifdef SOUVERAIN_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

#ifdef SOUVERAIN_BF16  // amx.h: the tiles' layout, and vdpbf16ps (every AMX CPU has it too)
using souverain::amx::kBlock;
using souverain::amx::kTile;
using souverain::amx::round_bf16;
using souverain::amx::to_bf16;
constexpr int64_t kPrefetch = 4;         // blocks read ahead
constexpr int64_t kGroupBytes = 512 << 10;  // bf16 weights a group of column blocks spans (in L2)

// Own the lines of an output block's rows before its products end, so their stores do not wait on memory.
inline void own_rows(at::BFloat16* y, int64_t ldy, int rows) {
  for (int r = 0; r < rows; ++r) _m_prefetchw(y + r * ldy);
}

// The accumulators' rows, rounded to bf16, into y (32 columns from y, rows ldy apart).
inline void write_rows(const float* acc, at::BFloat16* y, int64_t ldy, int rows) {
  for (int r = 0; r < rows; ++r) {
    _mm512_storeu_si512(y + r * ldy, to_bf16(_mm512_load_ps(acc + r * 32), _mm512_load_ps(acc + r * 32 + 16)));
  }
}


// silu(gate) * up from the accumulators of a gate block and its up block, into y: rounded as the
// separate ops round them (the product's bf16 output, then `swiglu` in cpu.cpp: silu rounded to bf16,
// the product rounded to bf16), with the same vector exp and division, so the same bits.
inline void write_glu(const float* gate, const float* up, at::BFloat16* y, int64_t ldy, int rows) {
  using fVec = at::vec::Vectorized<float>;
  const fVec one(1.f);
  for (int r = 0; r < rows; ++r) {
    __m512 out[2];
    for (int h = 0; h < 2; ++h) {
      const fVec g(round_bf16(_mm512_load_ps(gate + r * 32 + h * 16)));
      const fVec u(round_bf16(_mm512_load_ps(up + r * 32 + h * 16)));
      const fVec sig(round_bf16(g / (one + g.neg().exp())));
      out[h] = sig * u;
    }
    _mm512_storeu_si512(y + r * ldy, to_bf16(out[0], out[1]));
  }
}

// A product's operands: x's rows (bf16, contiguous within each row) and y [M, N] to fill.
struct Operands {
  Operands(const torch::Tensor& xt, int64_t NB)
      : M(xt.size(0)), N(NB * 32), ldx(xt.stride(0)),
        y(torch::empty({M, N}, xt.options().memory_format(at::MemoryFormat::Contiguous))),
        x(xt.data_ptr<at::BFloat16>()), out(y.data_ptr<at::BFloat16>()) {}
  int64_t M, N, ldx;
  torch::Tensor y;
  const at::BFloat16* x;
  at::BFloat16* out;
};

// A product over dequantised (or packed) panels of KB blocks each: its operands, and how a thread's column
// blocks go in groups whose panels fit in half of L2.
struct Panels : Operands {
  Panels(const torch::Tensor& xt, int64_t NB, int64_t KB, bool glu)
      : Operands(xt, glu ? NB / 2 : NB), outs(glu ? NB / 2 : NB), parts(glu ? 2 : 1), values(KB * kBlock),
        group(std::max<int64_t>(1, kGroupBytes / (values * 2 * parts))) {}
  int64_t outs, parts;    // output column blocks; weight panels each
  int64_t values, group;  // bf16 values of one panel; column blocks in a group
  // The calling thread's room for one group of the column blocks [begin, end), kept across calls, 64-byte aligned.
  at::BFloat16* space(int64_t begin, int64_t end) const {
    thread_local std::vector<uint16_t> room;
    const size_t need = static_cast<size_t>(std::min(group, end - begin) * parts * values + 32);
    if (room.size() < need) room.resize(need);
    return reinterpret_cast<at::BFloat16*>((reinterpret_cast<uintptr_t>(room.data()) + 63) & ~uintptr_t(63));
  }
};

inline __m512 bf16_to_float(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One 16-column tile of q4_linear's int4 layout (souverain/kernels/q4.cpp) for one block of 32 values of K,
// to a bf16 tile in VNNI order: (q - 8) * scale in fp32, rounded to bf16 (at most scale / 64 off). The
// block's zero is not added here: rounding (q - 8) * scale + zero to bf16 loses the codes' steps where
// the zero dominates (a block of one sign), which tripled SmolLM2's KL to fp32; the zeros' share comes
// from the zero tiles below instead. q4 keeps 4 parts of 64 bytes; byte 4c + i of part t holds column c's
// codes 4t + i (low nibble) and 16 + 4t + i (high nibble). Tile row r (values 2r and 2r + 1 of every
// column, lanes 2c and 2c + 1) is therefore the even (r even) or odd 16-bit words of part r / 2 for r < 8,
// low nibbles; rows 8-15 are the same bytes' high nibbles. sz: the tile's [scale, zero][16 columns].
inline void dequant_q4_tile(const uint8_t* q, const at::BFloat16* sz, at::BFloat16* out) {
  const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i first = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512 scale = bf16_to_float(sz);
  const __m512 s0 = _mm512_permutexvar_ps(first, scale), s1 = _mm512_permutexvar_ps(second, scale);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  auto row = [&](__m128i lanes0, __m128i lanes16, int shift, at::BFloat16* dst) {
    const __m512i a = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(lanes0, shift), nibble));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(lanes16, shift), nibble));
    const __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(a, centred), s0);
    const __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(b, centred), s1);
    _mm512_store_si512(dst, to_bf16(w0, w1));
  };
  for (int t = 0; t < 4; ++t) {
    const __m512i part = _mm512_loadu_si512(q + t * 64);
    for (int odd = 0; odd < 2; ++odd) {
      const __m256i bytes = _mm512_cvtepi32_epi16(odd ? _mm512_srli_epi32(part, 16) : part);
      const __m128i lanes0 = _mm256_castsi256_si128(bytes), lanes16 = _mm256_extracti128_si256(bytes, 1);
      const int r = 2 * t + odd;
      row(lanes0, lanes16, 0, out + r * 32);
      row(lanes0, lanes16, 4, out + (r + 8) * 32);
    }
  }
}

// The zero tile of a 16-column tile: row r pairs x's two bf16 parts of block `first + r`'s sum (hi, lo)
// with that block's zero in both lanes of each column; rows past `blocks` zero. sz points at the tile's
// first block's [scale, zero] (32 values a block).
inline void zero_tile(const at::BFloat16* sz, int64_t first, int64_t blocks, at::BFloat16* out) {
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t b = first + r;
    __m512i v = _mm512_setzero_si512();
    if (b < blocks) {
      const __m512i z = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + b * 32 + 16)));
      v = _mm512_or_si512(z, _mm512_slli_epi32(z, 16));
    }
    _mm512_store_si512(out + r * 32, v);
  }
}

// x [M, K] -> [M, K + Z]: each row, then the fp32 sum of each block of 32 values as two bf16 parts
// (hi, then lo = the rest), zeros to a whole number of 32-value blocks; the zero tiles multiply them.
torch::Tensor with_block_sums(const torch::Tensor& x, int64_t KB, int64_t ZB) {
  const int64_t M = x.size(0), K = KB * 32, KP = K + ZB * 32, ldx = x.stride(0);
  torch::Tensor xp = torch::empty({M, KP}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto* src = x.data_ptr<at::BFloat16>();
  auto* dst = xp.data_ptr<at::BFloat16>();
  souverain::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const at::BFloat16* in = src + m * ldx;
      at::BFloat16* out = dst + m * KP;
      std::memcpy(out, in, K * sizeof(at::BFloat16));
      alignas(64) float sums[2 * 2048];
      for (int64_t b = 0; b < KB; ++b) {
        const __m512 s = _mm512_add_ps(bf16_to_float(in + b * 32), bf16_to_float(in + b * 32 + 16));
        const float total = _mm512_reduce_add_ps(s);
        const float hi = static_cast<float>(static_cast<at::BFloat16>(total));
        sums[2 * b] = hi;
        sums[2 * b + 1] = total - hi;
      }
      for (int64_t e = 0; e < ZB * 32; ++e) out[K + e] = e < 2 * KB ? at::BFloat16(sums[e]) : at::BFloat16(0.f);
    }
  });
  return xp;
}


// The vector units' form of `product` below (AVX-512 BF16 without AMX: AMD Zen 4, Intel Cooper Lake): the
// same dequantised panels (the tiles' VNNI layout: row r of a tile holds K-pair r of 16 columns), each
// multiplied by R rows of x at a time with `vdpbf16ps`. An R x 32 output block keeps its 2R fp32
// accumulators in registers over all of K: per K-pair, two loads of the panel's 32 columns and R
// broadcasts of x's pair feed 2R products (R = 12: 24 accumulators, 2 operands, broadcasts in the rest of
// the 32 registers). Each row's sums run in one order whatever R or the rows around it: a row's result is
// the same alone or in any batch (not AMX's bits: the tiles sum in another order).
constexpr int kVectorRows = 12;

template <int R>
void vector_block(const at::BFloat16* x, int64_t ldx, int64_t kblocks, const at::BFloat16* w, float* acc) {
  __m512 c[R][2];
  for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const at::BFloat16* wb = w + kb * kBlock;
    const at::BFloat16* xb = x + kb * 32;
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_load_si512(wb + r * 32));
      const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_load_si512(wb + kTile + r * 32));
#pragma GCC unroll 12
      for (int i = 0; i < R; ++i) {
        int32_t pair;  // x's values 2r, 2r + 1 of row i
        std::memcpy(&pair, xb + i * ldx + 2 * r, sizeof(pair));
        const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        c[i][0] = _mm512_dpbf16_ps(c[i][0], a, w0);
        c[i][1] = _mm512_dpbf16_ps(c[i][1], a, w1);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_store_ps(acc + i * 32, c[i][0]);
    _mm512_store_ps(acc + i * 32 + 16, c[i][1]);
  }
}

using VectorBlock = void (*)(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, float*);

template <int... R>
constexpr std::array<VectorBlock, sizeof...(R)> vector_blocks(std::integer_sequence<int, R...>) {
  return {vector_block<R + 1>...};
}

// y = x @ w.T over dequantised panels: `dequant(nb, buffer)` writes column block nb's KB blocks into the
// buffer. Each thread takes a range of column blocks, in groups whose panels fit in half of L2; every R
// rows of x pass over a group's panels before the next R.
template <typename Dequant>
torch::Tensor vector_product(const torch::Tensor& x, int64_t NB, int64_t KB, Dequant dequant, bool glu) {
  static constexpr auto kernels = vector_blocks(std::make_integer_sequence<int, kVectorRows>{});
  const Panels p(x, NB, KB, glu);
  if (p.M == 0) return p.y;
  const int64_t M = p.M, N = p.N, ldx = p.ldx, outs = p.outs, parts = p.parts, group = p.group;
  souverain::parallel_for(0, outs, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kVectorRows * 32];
    alignas(64) float up[kVectorRows * 32];
    at::BFloat16* buffer = p.space(begin, end);
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group);
      auto panel = [&](int64_t nb, int64_t part) { return buffer + ((nb - g0) * parts + part) * p.values; };
      for (int64_t nb = g0; nb < g1; ++nb) {
        for (int64_t part = 0; part < parts; ++part) dequant(nb + part * outs, panel(nb, part));
      }
      for (int64_t m0 = 0; m0 < M; m0 += kVectorRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kVectorRows, M - m0));
        const VectorBlock multiply = kernels[rows - 1];
        for (int64_t nb = g0; nb < g1; ++nb) {
          at::BFloat16* y = p.out + m0 * N + nb * 32;
          multiply(p.x + m0 * ldx, ldx, KB, panel(nb, 0), acc);
          if (glu) {
            multiply(p.x + m0 * ldx, ldx, KB, panel(nb, 1), up);
            write_glu(acc, up, y, N, rows);
          } else {
            write_rows(acc, y, N, rows);
          }
        }
      }
    }
  });
  return p.y;
}
#endif

#ifdef SOUVERAIN_AMX
using souverain::amx::configure;

// acc (32 x 32 fp32) = one block of x's rows (16, or 32 when Two) times a column block's K/32
// weight blocks. `weights(kb)` gives where block kb's two tiles are, and may first do work for the
// blocks ahead (prefetching, dequantising), which overlaps the products already issued. Stream: load
// the weight's tiles with the non-temporal hint (TILELOADDT1), for weights read from L2 that should
// not push x's rows out of L1.
template <bool Two, bool Stream, typename Weights>
inline void block(const at::BFloat16* x, int64_t ldx, int64_t kblocks, float* acc, Weights weights) {
  _tile_zero(0);
  _tile_zero(1);
  if (Two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t stride = ldx * static_cast<int64_t>(sizeof(at::BFloat16));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const at::BFloat16* b = weights(kb);
    if (Stream) {
      _tile_stream_loadd(6, b, 64);
      _tile_stream_loadd(7, b + kTile, 64);
    } else {
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + kTile, 64);
    }
    _tile_loadd(4, x + kb * 32, stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (Two) {
      _tile_loadd(5, x + 16 * ldx + kb * 32, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  if (Two) {
    _tile_stored(2, acc + 512, 128);
    _tile_stored(3, acc + 528, 128);
  }
}

template <bool Stream, typename Weights>
inline void any_block(int rows, const at::BFloat16* x, int64_t ldx, int64_t kblocks, float* acc, Weights weights) {
  if (rows > 16) {
    block<true, Stream>(x, ldx, kblocks, acc, weights);
  } else {
    block<false, Stream>(x, ldx, kblocks, acc, weights);
  }
}

struct PanelRef {
  const at::BFloat16* w;
  const char* ahead;
  int64_t ahead_step;
};

// y = x @ w.T over the packed weight: `panel(nb, buffer)` gives column block nb's K/32 blocks of
// tiles (in place, or dequantised into the buffer) and where to prefetch the next blocks from.
//
// Each thread takes a range of column blocks, in groups whose weights fit in half of L2; every
// 32-row block of x passes over a group before the next, so each output row is written in runs of
// the group's width rather than one 64-byte piece per row down a tall output.
template <typename Panel>
torch::Tensor product(const torch::Tensor& x, int64_t NB, int64_t KB, Panel panel, bool glu) {
  const Panels p(x, NB, KB, glu);
  if (p.M == 0) return p.y;
  const int64_t M = p.M, N = p.N, ldx = p.ldx, outs = p.outs, parts = p.parts, group = p.group;
  souverain::parallel_for(0, outs, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[32 * 32];
    alignas(64) float up[32 * 32];
    thread_local std::vector<PanelRef> panels;
    at::BFloat16* buffer = p.space(begin, end);
    int cur0 = -1, cur1 = -1;
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group);
      panels.clear();
      for (int64_t nb = g0; nb < g1; ++nb) {
        for (int64_t part = 0; part < parts; ++part) {
          panels.push_back(panel(nb + part * outs, buffer + ((nb - g0) * parts + part) * p.values));
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int rows = static_cast<int>(std::min<int64_t>(32, M - m0));
        const int r0 = std::min(rows, 16), r1 = rows - r0;
        if (r0 != cur0 || r1 != cur1) {  // the last, partial block of rows needs shorter tiles
          configure(r0, r1);
          cur0 = r0;
          cur1 = r1;
        }
        // The first pass over a panel in memory fetches its next blocks from memory. Other passes
        // find the panel in L2 and leave it there: the weight's tiles are loaded with the streaming
        // hint and not prefetched into L1, where they would evict the block of x's rows that every
        // panel of the group reads again.
        auto multiply = [&](const PanelRef& ref, float* into) {
          const bool from_memory = m0 == 0 && ref.ahead != nullptr;
          any_block<true>(rows, p.x + m0 * ldx, ldx, KB, into, [&](int64_t kb) {
            // Read bytes some blocks ahead (past the end this fetches nothing useful, and never faults).
            if (from_memory) {
              for (int64_t i = 0; i < ref.ahead_step; i += 64) _mm_prefetch(ref.ahead + kb * ref.ahead_step + i, _MM_HINT_T0);
            }
            return ref.w + kb * kBlock;
          });
        };
        for (int64_t nb = g0; nb < g1; ++nb) {
          at::BFloat16* y = p.out + m0 * N + nb * 32;
          own_rows(y, N, rows);
          multiply(panels[(nb - g0) * parts], acc);
          if (glu) {
            multiply(panels[(nb - g0) * parts + 1], up);
            write_glu(acc, up, y, N, rows);
          } else {
            write_rows(acc, y, N, rows);
          }
        }
      }
    }
    _tile_release();
  });
  return p.y;
}

// y = x @ w.T for a quantised weight and at most 32 rows of x: one pass over the weight, so each
// block is dequantised just before its products, a few blocks ahead into a small ring that stays in
// L1, and the vector units dequantise while the tiles multiply (with more rows, `product`
// dequantises whole panels first, since each then serves many row blocks). `dequant(nb, kb, out)`
// writes block (nb, kb)'s two bf16 tiles, and fetches the bytes of the blocks ahead. Same values,
// same order of sums as `product`: the same bits.
template <typename Dequant>
torch::Tensor small(const torch::Tensor& x, int64_t NB, int64_t KB, Dequant dequant, bool glu) {
  constexpr int64_t kAhead = 2, kRing = 4;  // blocks dequantised ahead; ring slots
  const int64_t outs = glu ? NB / 2 : NB;
  const Operands o(x, outs);
  if (o.M == 0) return o.y;
  const int64_t M = o.M, N = o.N, ldx = o.ldx;
  const int rows = static_cast<int>(M);
  souverain::parallel_for(0, outs, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[32 * 32];
    alignas(64) float up[32 * 32];
    alignas(64) at::BFloat16 ring[kRing * kBlock];
    configure(std::min(rows, 16), std::max(rows - 16, 0));
    auto multiply = [&](int64_t nb, float* into) {
      for (int64_t kb = 0; kb < std::min(kAhead, KB); ++kb) dequant(nb, kb, ring + kb % kRing * kBlock);
      any_block<false>(rows, o.x, ldx, KB, into, [&](int64_t kb) {
        const int64_t next = kb + kAhead;
        if (next < KB) dequant(nb, next, ring + next % kRing * kBlock);
        return ring + kb % kRing * kBlock;
      });
    };
    for (int64_t nb = begin; nb < end; ++nb) {
      at::BFloat16* y = o.out + nb * 32;
      own_rows(y, N, rows);
      multiply(nb, acc);
      if (glu) {
        multiply(nb + outs, up);
        write_glu(acc, up, y, N, rows);
      } else {
        write_rows(acc, y, N, rows);
      }
    }
    _tile_release();
  });
  return o.y;
}
#endif

}  // namespace

namespace souverain {

// Whether this build has the AMX kernel and the OS lets this process use the tiles.
bool amx_available() {
#ifdef SOUVERAIN_AMX
  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux hands out AMX state on request only.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

bool bf16_supported(int64_t isa) {
  if (isa == 1024) return amx_available();
#ifdef SOUVERAIN_BF16
  return isa == 512;
#else
  return false;
#endif
}

static void check_x(const char* name, const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), name, ": x must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 &&
                  (x.size(0) <= 1 || x.stride(0) >= x.size(1)),
              name, ": x must be bfloat16 [M, K] with contiguous rows");
  TORCH_CHECK(x.size(1) == K, name, ": x has ", x.size(1), " columns, the weight ", K);
}

static void check_glu(const char* name, bool glu, int64_t NB) {
  TORCH_CHECK(!glu || NB % 2 == 0, name, ": glu needs the [gate | up] halves in whole 32-column blocks");
}

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, bool glu) {
  TORCH_CHECK(amx_available(), "amx_linear: this CPU or build has no AMX");
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 5 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.size(2) == 2 && packed.size(3) == 16 && packed.size(4) == 32,
              "amx_linear: the weight must be packed bfloat16 [N/32, K/32, 2, 16, 32]");
  const int64_t NB = packed.size(0), KB = packed.size(1);
  check_x("amx_linear", x, KB * 32);
  check_glu("amx_linear", glu, NB);
#ifdef SOUVERAIN_AMX
  const auto* wp = packed.data_ptr<at::BFloat16>();
  return product(x, NB, KB, [&](int64_t nb, at::BFloat16*) {
    const at::BFloat16* w = wp + nb * KB * kBlock;
    return PanelRef{w, reinterpret_cast<const char*>(w + kPrefetch * kBlock), kBlock * 2};
  }, glu);
#else
  return x;
#endif
}

torch::Tensor q4_linear_bf16(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, bool glu, int64_t isa) {
  TORCH_CHECK(bf16_supported(isa), "q4_linear_bf16: isa ", isa, " does not run here (1024: AMX tiles, granted by the "
              "OS; 512: AVX-512 BF16)");
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) % 2 == 0 && codes.size(2) == 4 && codes.size(3) == 64,
              "q4_linear_bf16: the weight must be q4_linear's uint8 [N/16, K/32, 4, 64] with N a multiple of 32");
  const int64_t NB = codes.size(0) / 2, KB = codes.size(1);
  TORCH_CHECK(sz.device().is_cpu() && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  sz.sizes() == at::IntArrayRef({2 * NB, KB, 2, 16}),
              "q4_linear_bf16: scales and zeros must be bfloat16 [N/16, K/32, 2, 16]");
  TORCH_CHECK(KB <= 2048, "q4_linear_bf16: K is at most 65,536");
  check_x("q4_linear_bf16", x, KB * 32);
  check_glu("q4_linear_bf16", glu, NB);
#ifdef SOUVERAIN_BF16
  // K's blocks of (q - 8) * scale, then ZB blocks pairing x's block sums with the zeros.
  const int64_t ZB = (2 * KB + 31) / 32;
  const torch::Tensor xp = with_block_sums(x, KB, ZB);
  const auto* qp = codes.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  constexpr int64_t kCodes = 4 * 64;  // bytes of one tile's block
  auto dequant = [=](int64_t nb, int64_t kb, at::BFloat16* out) {
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t tile = (2 * nb + h) * KB;
      if (kb >= KB) {
        zero_tile(sp + tile * 32, (kb - KB) * 16, KB, out + h * kTile);
        continue;
      }
      const char* ahead = reinterpret_cast<const char*>(qp + (tile + kb + kPrefetch) * kCodes);
      for (int64_t i = 0; i < kCodes; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(sp + (tile + kb + kPrefetch) * 32), _MM_HINT_T0);
      dequant_q4_tile(qp + (tile + kb) * kCodes, sp + (tile + kb) * 32, out + h * kTile);
    }
  };
  auto panel = [&](int64_t nb, at::BFloat16* buffer) {
    for (int64_t kb = 0; kb < KB + ZB; ++kb) dequant(nb, kb, buffer + kb * kBlock);
  };
#ifdef SOUVERAIN_AMX
  if (isa == 1024) {
    if (x.size(0) <= 32) return small(xp, NB, KB + ZB, dequant, glu);
    return product(xp, NB, KB + ZB, [&](int64_t nb, at::BFloat16* buffer) {
      panel(nb, buffer);
      return PanelRef{buffer, nullptr, 0};
    }, glu);
  }
#endif
  return vector_product(xp, NB, KB + ZB, panel, glu);
#else
  return x;
#endif
}

}  // namespace souverain
