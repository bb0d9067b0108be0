// Causal attention of prefill chunks in bf16 products, on AMX tiles (isa 1024) or on AVX-512 BF16's
// vector units (isa 512: AMD Zen 4, Intel Cooper Lake and later; `VectorTiles`): chunks that start their sequences
// (`prefill_attention`: keys and values from this step's rows) and chunks that continue them after
// cached keys (`prefill_attention_cached`: every key read from the paged cache, this step's stored
// first), e.g. a prompt split over steps or a conversation's next turn after a prefix-cache hit.
//
// PyTorch's CPU flash attention spends most of its time outside the arithmetic at these sizes: for
// SmolLM2's shapes (9 query heads over 3 kv heads, head size 64) one 200-token sequence took ~0.4 ms
// a layer and one of 1,000 tokens ~4-5.6 ms (~0.2-0.3 TFLOP/s). Here each unit of work is one query
// head and 32 queries, taking the keys a chunk (up to 256) at a time: S = Q K^T on the tiles, the
// online softmax in fp32 on the vector units (exp as ATen's `exp_u20`, the one PyTorch's flash
// attention uses), P rounded to bf16 and P V on the tiles, the output divided by the softmax sum at
// the end: the flash-attention algorithm, as PyTorch's. Results agree with it to bf16 rounding, not
// to the bit (sums in another order). A sequence's result does not depend on the others in the call.
//
// Every sequence's keys and values are first packed, per kv head, as the right operand of the tile
// products (the weight layout of gemm.cpp: K as a [keys, hd] weight, V as [hd, keys]), zero past the
// last key; the query heads sharing a kv head read the same packed copy.
//
// Measured against F.scaled_dot_product_attention one sequence at a time (as the engine called it
// before), one process alternating the two, 60 rounds, SmolLM2's shapes: five 200-row sequences and
// one of 24: 1.05-1.17 ms against 2.4-2.7 (0.43x); one of 1,000 rows: 2.36-2.47 ms against 4.0-4.2
// (0.58x). Chunks of 128 keys instead of 256: 0.60-0.77x; 32 keys (even with two blocks' steps
// interleaved): 0.75-0.95x. From the cache, against the engine's masked SDPA over gathered keys
// (40 rounds): 176 queries after 24 cached keys 224 us against 631; 200 after 1,000: 1.63 ms against
// 2.53; 1,000 after none: 3.6 ms against 9.5.
//
// Without AMX (AMD EPYC Zen 4, 2 cores) the prompt rows went through cpu.cpp's vector kernel (fp32 dot
// products per key): in bench/step_profile.py's prefill of 1,000 tokens (two steps of 512) it took 28%
// of the time. With the same algorithm on vdpbf16ps it takes 13%: the step 1322 -> 972-997 ms (median),
// bench/serve.py's TTFT of a 1k-token prompt 1.16 -> 0.94 s. With the products' accumulators in registers over
// a whole block's sum (`VectorTiles::product`) instead of loaded and stored around each 32-value step, 14.6% ->
// 13.3% of the (then 1,020 ms) step, after gemm.cpp's vector products had taken the linears; the products are
// then about 2/3 of the attention's time at vdpbf16ps's peak, the softmax's exp most of the rest.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include "amx.h"
#include "kernels.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

#ifdef SOUVERAIN_BF16  // amx.h: vdpbf16ps, the tiles' products on the vector units (every AMX CPU has it too)
using bf16 = at::BFloat16;
using souverain::amx::kBlock;
using souverain::amx::kTile;
using souverain::amx::to_bf16;
constexpr int64_t kIsaAmx = 1024, kIsaAvx512 = 512;

// The one tile operation the attention is written in -- a 32 x 32 fp32 block (rows `ldo` floats apart) =
// the sum over t < `blocks` of A_t (32 rows of 32 bf16 values from a + 32 t, rows `lda` apart) times the
// packed block of B at b + t * kBlock (two tiles, pairs of K in VNNI order) -- on AMX tiles or on AVX-512
// BF16's vector units. One object per thread; `rows(half)` before a block's products: whether rows 16-31 are
// in use (AMX configures its tiles for it; `two` in the products says the same).
#ifdef SOUVERAIN_AMX
class AmxTiles {
 public:
  AmxTiles() = default;
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
  ~AmxTiles() {
    if (configured_ >= 0) _tile_release();
  }
  void rows(int half) {
    if (half != configured_) {
      souverain::amx::configure(16, half);
      configured_ = half;
    }
  }
  static void product(const bf16* a, int64_t lda, const bf16* b, int64_t blocks, bool two, float* out, int64_t ldo) {
    souverain::amx::zero_accumulators(two);
    for (int64_t t = 0; t < blocks; ++t) souverain::amx::multiply_block(a + t * 32, lda, b + t * kBlock, two);
    souverain::amx::store_accumulators(out, ldo, two);
  }

 private:
  int configured_ = -1;
};
#endif

// The same products with `vdpbf16ps` (AMD Zen 4, Intel Cooper Lake and later): 8 rows of A at a time against
// B's 32 columns, their 16 accumulators in registers over all the blocks (16 independent chains: the
// instruction's latency is covered); per pair of K, two loads of B and 8 broadcasts of A's pairs feed 16
// products, lane by lane as the tiles do. Sums in another order than AMX's: results agree to fp32 rounding,
// not to the bit. (Accumulators kept in memory between blocks instead, loaded and stored around each
// block's products, took 14.6% of a 1,000-token prefill on AMD Zen 4; see the top.)
class VectorTiles {
 public:
  void rows(int) {}
  static void product(const bf16* a, int64_t lda, const bf16* b, int64_t blocks, bool two, float* out, int64_t ldo) {
    for (int64_t i0 = 0; i0 < (two ? 32 : 16); i0 += 8) {
      __m512 acc[8][2];
      for (int64_t i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int64_t t = 0; t < blocks; ++t) {
        const bf16* bt = b + t * kBlock;
        const bf16* at = a + i0 * lda + t * 32;
#pragma GCC unroll 16
        for (int64_t r = 0; r < 16; ++r) {
          const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bt + r * 32));
          const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bt + kTile + r * 32));
#pragma GCC unroll 8
          for (int64_t i = 0; i < 8; ++i) {
            int32_t pair;  // A's values 2r, 2r + 1 of row i0 + i
            std::memcpy(&pair, at + i * lda + 2 * r, sizeof(pair));
            const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);
          }
        }
      }
      for (int64_t i = 0; i < 8; ++i) {
        _mm512_storeu_ps(out + (i0 + i) * ldo, acc[i][0]);
        _mm512_storeu_ps(out + (i0 + i) * ldo + 16, acc[i][1]);
      }
    }
  }
};

// rows [n, hd] (rows `ld` apart) -> [ceil(n/32), hd/32, 2, 16, 32]: as a weight [keys, hd] (gemm.cpp's
// layout), keys past n zero. Lane 2c + j of tile row r in block (kb, ks, h) is
// rows[kb*32 + h*16 + c][ks*32 + 2r + j]: a 16 x 16 transpose of value pairs, a gather per tile row.
void pack_keys(const bf16* rows, int64_t ld, int64_t n, int64_t hd, bf16* out) {
  const int64_t blocks = (n + 31) / 32, steps = hd / 32;
  const auto* pairs = reinterpret_cast<const int*>(rows);  // ld and hd are even: rows start on pairs
  const __m512i key = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(ld / 2)));
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t first = kb * 32 + h * 16, valid = std::clamp<int64_t>(n - first, 0, 16);
      const __mmask16 present = static_cast<__mmask16>((1u << valid) - 1);
      for (int64_t ks = 0; ks < steps; ++ks) {
        auto* tile = reinterpret_cast<__m512i*>(out + ((kb * steps + ks) * 2 + h) * kTile);
        const int* base = pairs + first * (ld / 2) + ks * 16;
        for (int64_t r = 0; r < 16; ++r) {
          _mm512_storeu_si512(tile + r, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, key, base + r, 4));
        }
      }
    }
  }
}

// Two rows of 16 values interleaved into one tile row (lane 2c + j: row j's value c), zeros for a null row.
inline __m512i interleave_rows(const bf16* a, const bf16* b, __mmask16 valid = 0xFFFF) {
  alignas(64) static const int16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m256i va = a ? _mm256_maskz_loadu_epi16(valid, a) : _mm256_setzero_si256();
  const __m256i vb = b ? _mm256_maskz_loadu_epi16(valid, b) : _mm256_setzero_si256();
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(va), _mm512_load_si512(order), _mm512_castsi256_si512(vb));
}

// Keys [n, hd] from the paged cache's transposed layout (souverain/engine/kv_cache.py: each block
// [Hkv, hd, bs] per layer) into pack_keys' layout: 16 keys of a tile lie in one cache block
// (bs a multiple of 16), each dimension's 16 values contiguous, so a tile row is two dimensions' rows
// interleaved. kc points at kv head g of the layer; `block_stride` values from one cache block to the next.
template <typename Ahead>
void pack_keys_cached(const bf16* kc, int64_t block_stride, const int32_t* table, int64_t bs, int64_t n, int64_t hd,
                      bf16* out, Ahead ahead) {
  const int64_t blocks = (n + 31) / 32, steps = hd / 32;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    ahead(kb);
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t first = kb * 32 + h * 16, valid = std::clamp<int64_t>(n - first, 0, 16);
      const __mmask16 present = static_cast<__mmask16>((1u << valid) - 1);
      const bf16* tile_keys = valid ? kc + table[first / bs] * block_stride + first % bs : nullptr;
      for (int64_t ks = 0; ks < steps; ++ks) {
        bf16* tile = out + ((kb * steps + ks) * 2 + h) * kTile;
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t d = ks * 32 + 2 * r;
          const __m512i row = valid ? interleave_rows(tile_keys + d * bs, tile_keys + (d + 1) * bs, present)
                                    : _mm512_setzero_si512();
          _mm512_storeu_si512(tile + r * 32, row);
        }
      }
    }
  }
}

// Values [n, hd] -> [hd/32, ceil(n/32), 2, 16, 32]: as a weight [hd, keys] (V^T). Lane 2c + j of tile
// row r in block (db, kb, h) is value row kb*32 + 2r + j, column db*32 + h*16 + c: two rows
// interleaved. `row(key)` is where a value row starts.
template <typename Row>
void pack_values(Row row, int64_t n, int64_t hd, bf16* out) {
  const int64_t blocks = (n + 31) / 32;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t key = kb * 32 + 2 * r;
      const bf16* a = key < n ? row(key) : nullptr;
      const bf16* b = key + 1 < n ? row(key + 1) : nullptr;
      for (int64_t d = 0; d < hd; d += 16) {
        bf16* tile = out + (((d / 32) * blocks + kb) * 2 + (d / 16) % 2) * kTile;
        _mm512_storeu_si512(tile + r * 32, interleave_rows(a ? a + d : nullptr, b ? b + d : nullptr));
      }
    }
  }
}

struct Span {
  int64_t row, count;    // first row in the step, rows (queries)
  int64_t start;         // keys before the first query (cached); the keys are [0, start + count)
  int64_t keys, blocks;  // start + count, and its 32-key blocks
  int64_t packed;        // where its packed keys (and values) start, in values
};

// 32 query rows of a span against their keys (each row [0, its position + 1)): the online softmax over
// chunks of up to kChunk blocks of 32 keys. Scores leave the tiles, and probabilities
// enter them, a chunk at a time: each hand-over between tiles and vector units waits for the other
// side's stores to drain, and the row maxima, sums and rescaling cost the same for 32 keys as for
// a chunk.
constexpr int64_t kChunk = 8;
constexpr int64_t kWidth = kChunk * 32;  // keys in a chunk

struct QueryRow {
  const bf16* q;  // the query (head_dim values)
  bf16* out;      // where its output goes
  int64_t keys;   // keys it reads: [0, keys)
};

// Rows are (position, head) pairs: the query heads sharing the kv head side by side, so a decode step's
// few rows fill one block. A row's result depends on its own query and keys only (tile rows are
// independent, keys are taken in chunks aligned to position 0, masked keys add exact zeros): the same
// bits whatever rows share its block -- a token decoded, or prefilled in any chunking.
template <typename Tiles>
class QueryBlock {
 public:
  QueryBlock(Tiles& tiles, const QueryRow* rows, int64_t n, const bf16* kp, const bf16* vp, const Span& s, int64_t hd,
             float scale)
      : tiles_(tiles), kp_(kp), vp_(vp), s_(s), rows_(n), two_(n > 16), live_(n > 16 ? 32 : 16), hd_(hd), steps_(hd / 32),
        scale_(scale) {
    // Only what is read is set (a decode step's block has 3 rows of 16 for SmolLM2's 3:1 heads).
    for (int64_t i = 0; i < live_; ++i) {
      if (i < rows_) {
        std::memcpy(qbuf_ + i * hd, rows[i].q, hd * sizeof(bf16));
        keys_[i] = rows[i].keys;
        out_[i] = rows[i].out;
      } else {  // rows past the block's: zero, computed by the tiles and dropped
        std::memset(qbuf_ + i * hd, 0, hd * sizeof(bf16));
        keys_[i] = 1;
        out_[i] = nullptr;
      }
    }
    std::fill(run_max_, run_max_ + 32, -std::numeric_limits<float>::infinity());
    std::fill(run_sum_, run_sum_ + 32, 0.f);  // (acc_ is set by the first chunk's accumulate)
  }

  void run(int64_t last) {
    for (int64_t c0 = 0; c0 <= last; c0 += kChunk) {
      const int64_t n = std::min(kChunk, last + 1 - c0);
      scores(c0, n);
      softmax(c0, n);
      products(c0, n);
      accumulate(c0 == 0);
    }
  }

  void write() const {
    for (int64_t i = 0; i < rows_; ++i) {
      const __m512 inv = _mm512_set1_ps(1.f / run_sum_[i]);
      for (int64_t d = 0; d < hd_; d += 32) {
        const __m512 lo = _mm512_mul_ps(_mm512_load_ps(acc_ + i * hd_ + d), inv);
        const __m512 hi = _mm512_mul_ps(_mm512_load_ps(acc_ + i * hd_ + d + 16), inv);
        _mm512_storeu_si512(out_[i] + d, to_bf16(lo, hi));
      }
    }
  }

 private:
  // S = Q K^T for key blocks c0 .. c0 + n - 1, into scores_ (rows kWidth apart).
  void scores(int64_t c0, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      tiles_.product(qbuf_, hd_, kp_ + (c0 + j) * steps_ * kBlock, steps_, two_, scores_ + j * 32, kWidth);
    }
  }

  // The online softmax's step for the chunk: probabilities (bf16) into probs_, the factor the sums
  // so far are scaled by into alpha_.
  void softmax(int64_t c0, int64_t n) {
    using fVec = at::vec::Vectorized<float>;
    const __m512 scl = _mm512_set1_ps(scale_), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const int64_t vectors = 2 * n;
    alignas(64) float old_max[32] = {}, chunk_sum[32] = {};
    for (int64_t i = 0; i < rows_; ++i) {  // (the block's rows past rows_ are computed by the tiles, not read)
      // Keys up to the query's own position, and within the span (queries past it see all of its keys).
      const int64_t limit = keys_[i] - c0 * 32;  // keys of this chunk the row reads (none: <= 0)
      const float* row = scores_ + i * kWidth;
      __m512 sv[2 * kChunk];
      __mmask16 mv[2 * kChunk];
      __m512 top = neg_inf;
      for (int64_t u = 0; u < vectors; ++u) {
        const int64_t left = limit - 16 * u;
        mv[u] = left >= 16 ? 0xFFFF : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
        sv[u] = _mm512_maskz_mul_ps(mv[u], _mm512_load_ps(row + 16 * u), scl);
        top = _mm512_max_ps(top, _mm512_mask_mov_ps(neg_inf, mv[u], sv[u]));
      }
      const float mx = std::max(run_max_[i], _mm512_reduce_max_ps(top));
      const __m512 m = _mm512_set1_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      bf16* p = probs_ + i * kWidth;
      for (int64_t u = 0; u < vectors; u += 2) {
        const __m512 e0 = _mm512_maskz_mov_ps(mv[u], static_cast<__m512>(fVec(_mm512_sub_ps(sv[u], m)).exp_u20()));
        const __m512 e1 = _mm512_maskz_mov_ps(mv[u + 1], static_cast<__m512>(fVec(_mm512_sub_ps(sv[u + 1], m)).exp_u20()));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_store_si512(p + 16 * u, to_bf16(e0, e1));
      }
      chunk_sum[i] = _mm512_reduce_add_ps(sum);
      old_max[i] = run_max_[i];
      run_max_[i] = mx;
    }
    for (int64_t i = 0; i < live_; i += 16) {
      // exp(old max - new max): 0 for the first chunk (nothing summed yet), else in (0, 1].
      const __m512 a = c0 == 0 ? _mm512_setzero_ps()
                               : static_cast<__m512>(fVec(_mm512_sub_ps(_mm512_load_ps(old_max + i),
                                                                        _mm512_load_ps(run_max_ + i))).exp_u20());
      _mm512_store_ps(alpha_ + i, a);
      _mm512_store_ps(run_sum_ + i, _mm512_fmadd_ps(_mm512_load_ps(run_sum_ + i), a, _mm512_load_ps(chunk_sum + i)));
    }
  }

  // P V for the chunk's n key blocks, 32 columns of the output at a time, summed in the tiles, into pv_.
  void products(int64_t c0, int64_t n) {
    for (int64_t db = 0; db < steps_; ++db) {
      tiles_.product(probs_, kWidth, vp_ + (db * s_.blocks + c0) * kBlock, n, two_, pv_ + db * 1024, 32);
    }
  }

  // acc = acc * alpha + P V, row by row (the first chunk: acc = P V).
  void accumulate(bool first) {
    for (int64_t i = 0; i < rows_; ++i) {
      const __m512 al = _mm512_set1_ps(alpha_[i]);
      for (int64_t db = 0; db < steps_; ++db) {
        float* a = acc_ + i * hd_ + db * 32;
        const float* p = pv_ + db * 1024 + i * 32;
        if (first) {
          _mm512_store_ps(a, _mm512_load_ps(p));
          _mm512_store_ps(a + 16, _mm512_load_ps(p + 16));
        } else {
          _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_load_ps(a), al, _mm512_load_ps(p)));
          _mm512_store_ps(a + 16, _mm512_fmadd_ps(_mm512_load_ps(a + 16), al, _mm512_load_ps(p + 16)));
        }
      }
    }
  }

  Tiles& tiles_;
  const bf16 *kp_, *vp_;
  const Span& s_;
  const int64_t rows_;
  const bool two_;      // rows 16-31 in use (the tiles configured for both halves); else rows 0-15 only
  const int64_t live_;  // rows computed: 32 or 16
  const int64_t hd_, steps_;
  int64_t keys_[32];
  bf16* out_[32];
  const float scale_;
  alignas(64) bf16 qbuf_[32 * 256];
  alignas(64) float scores_[32 * kWidth];
  alignas(64) bf16 probs_[32 * kWidth];
  alignas(64) float pv_[8 * 32 * 32];
  alignas(64) float acc_[32 * 256];
  alignas(64) float alpha_[32];
  alignas(64) float run_max_[32];
  alignas(64) float run_sum_[32];
};
#endif

void check_rows(const torch::Tensor& t, const char* name, int64_t n, int64_t hd) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 3 && t.size(0) == n &&
                  t.size(2) == hd && t.stride(2) == 1 && t.stride(1) == hd && t.stride(0) >= t.size(1) * hd,
              "prefill_attention: ", name, " must be bfloat16 [N, heads, head_dim] with contiguous rows");
}

}  // namespace

namespace souverain {

bool prefill_supported(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t isa) {
  const bool shapes = n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim % 32 == 0 && head_dim <= 256;
#ifdef SOUVERAIN_BF16
  if (isa == kIsaAvx512) return shapes;
#endif
#ifdef SOUVERAIN_AMX
  if (isa == kIsaAmx) return shapes && amx_available();
#endif
  return false;
}

namespace {

#ifdef SOUVERAIN_BF16
// One block of up to 32 rows of span s, kv head g (rows (position, query head), position-major, from row
// `first` of the span's count * group), against the packed keys and values at kp, vp, on the calling
// thread's tiles.
template <typename Tiles>
void attend_block(Tiles& tiles, const torch::Tensor& q, const torch::Tensor& out, const Span& s, int64_t g,
                  int64_t group, int64_t first, const bf16* kp, const bf16* vp, float scale) {
  const int64_t hd = q.size(2), n = std::min<int64_t>(32, s.count * group - first);
  const auto* qp = q.data_ptr<bf16>();
  auto* op = out.data_ptr<bf16>();
  QueryRow rows[32];
  int64_t most = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = (first + i) / group, head = g * group + (first + i) % group;
    rows[i] = {qp + (s.row + pos) * q.stride(0) + head * hd, op + (s.row + pos) * out.stride(0) + head * hd,
               s.start + pos + 1};
    most = std::max(most, rows[i].keys);
  }
  tiles.rows(n > 16 ? 16 : 0);
  QueryBlock<Tiles> block(tiles, rows, n, kp, vp, s, hd, scale);
  block.run((most - 1) / 32);
  block.write();
}

// The attention of every span's queries; `pack(span, kv head, keys out, values out)` packs a span's keys
// and values for a kv head. Spans whose rows fit one block (a decode step's: one position, 3 rows a kv head
// for SmolLM2) are packed and attended by one thread, the copy still in its cache (packing them all first
// into one buffer, megabytes for 32 sequences, then reading them back was a third of a 32-stream decode
// step); the others (prefill chunks) are packed first, then their blocks shared out. The same arithmetic
// for a row either way: its result does not depend on the path.
template <typename Tiles, typename Pack>
void attend_spans(const torch::Tensor& q, const torch::Tensor& out, int64_t kv_heads, std::vector<Span>& ss,
                  double scale, Pack pack) {
  const int64_t heads = q.size(1), hd = q.size(2), group = heads / kv_heads;
  const float sc = static_cast<float>(scale);
  std::vector<int64_t> small, big;
  for (int64_t si = 0; si < static_cast<int64_t>(ss.size()); ++si) {
    (ss[si].count * group <= 32 ? small : big).push_back(si);
  }
  souverain::parallel_for(0, static_cast<int64_t>(small.size()) * kv_heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<bf16> own_keys, own_values;
    Tiles tiles;
    for (int64_t j = begin; j < end; ++j) {
      const Span& s = ss[small[j / kv_heads]];
      const int64_t g = j % kv_heads, size = s.blocks * 32 * hd;
      if (static_cast<int64_t>(own_keys.size()) < size) {
        own_keys.resize(size);
        own_values.resize(size);
      }
      pack(s, g, own_keys.data(), own_values.data());
      attend_block(tiles, q, out, s, g, group, 0, own_keys.data(), own_values.data(), sc);
    }
  });
  if (big.empty()) return;
  int64_t packed = 0;
  for (const int64_t si : big) {
    ss[si].packed = packed;
    packed += ss[si].blocks * 32 * kv_heads * hd;
  }
  // The packed copies, kept by the calling thread from call to call (a fresh allocation this size
  // is fresh pages from the OS each time, ~0.1 ms of page faults).
  thread_local std::vector<bf16> key_space, value_space;
  if (static_cast<int64_t>(key_space.size()) < packed) {
    key_space.resize(packed);
    value_space.resize(packed);
  }
  bf16* const keys = key_space.data();
  bf16* const values = value_space.data();
  souverain::parallel_for(0, static_cast<int64_t>(big.size()) * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const Span& s = ss[big[j / kv_heads]];
      const int64_t g = j % kv_heads, off = s.packed + g * s.blocks * 32 * hd;
      pack(s, g, keys + off, values + off);
    }
  });
  // Units: 32 rows of one span and kv head, rows (position, query head) position-major; a span's units
  // taken first, last, second, second to last... so each thread gets as many long rows as short ones.
  std::vector<std::array<int64_t, 3>> units;
  for (const int64_t si : big) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t lo = 0, hi = (ss[si].count * group + 31) / 32 - 1; lo <= hi; ++lo, --hi) {
        units.push_back({si, g, lo});
        if (hi != lo) units.push_back({si, g, hi});
      }
    }
  }
  souverain::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    Tiles tiles;
    for (int64_t u = begin; u < end; ++u) {
      const auto [si, g, ub] = units[u];
      const Span& s = ss[si];
      const int64_t off = s.packed + g * s.blocks * 32 * hd;
      attend_block(tiles, q, out, s, g, group, ub * 32, keys + off, values + off, sc);
    }
  });
}

// attend_spans on `isa`'s tiles (prefill_supported said yes).
template <typename Pack>
void attend_spans_on(int64_t isa, const torch::Tensor& q, const torch::Tensor& out, int64_t kv_heads,
                     std::vector<Span>& ss, double scale, Pack pack) {
#ifdef SOUVERAIN_AMX
  if (isa == kIsaAmx) return attend_spans<AmxTiles>(q, out, kv_heads, ss, scale, pack);
#endif
  attend_spans<VectorTiles>(q, out, kv_heads, ss, scale, pack);
}
#endif

void check_span(int64_t row, int64_t count, int64_t n) {
  TORCH_CHECK(row >= 0 && count > 0 && row + count <= n, "prefill_attention: span (", row, ", ", count,
              ") outside the ", n, " rows");
}

}  // namespace

void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                       std::vector<std::pair<int64_t, int64_t>> spans, double scale, int64_t isa) {
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(prefill_supported(heads, kv_heads, hd, isa), "prefill_attention: not supported here (isa ", isa,
              ") for ", heads, " heads, ", kv_heads, " kv heads, head size ", hd);
  check_rows(q, "q", n, hd);
  check_rows(k, "k", n, hd);
  check_rows(v, "v", n, hd);
  check_rows(out, "out", n, hd);
  TORCH_CHECK(v.size(1) == kv_heads && out.size(1) == heads, "prefill_attention: head counts differ");
#ifdef SOUVERAIN_BF16
  std::vector<Span> ss;
  for (const auto& [row, count] : spans) {
    check_span(row, count, n);
    ss.push_back({row, count, 0, count, (count + 31) / 32, 0});
  }
  const auto* kp = k.data_ptr<bf16>();
  const auto* vp = v.data_ptr<bf16>();
  const int64_t ldk = k.stride(0), ldv = v.stride(0);
  attend_spans_on(isa, q, out, kv_heads, ss, scale, [&](const Span& s, int64_t g, bf16* keys, bf16* values) {
    pack_keys(kp + s.row * ldk + g * hd, ldk, s.count, hd, keys);
    pack_values([&](int64_t key) { return vp + (s.row + key) * ldv + g * hd; }, s.count, hd, values);
  });
#endif
}

void prefill_attention_cached(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor out,
                              std::vector<std::tuple<int64_t, int64_t, int64_t>> spans, torch::Tensor tables,
                              int64_t block_size, double scale, int64_t isa) {
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2), kv_heads = v_cache.dim() == 3 ? v_cache.size(1) : 0;
  TORCH_CHECK(prefill_supported(heads, kv_heads, hd, isa), "prefill_attention: not supported here (isa ", isa,
              ") for ", heads, " heads, ", kv_heads, " kv heads, head size ", hd);
  check_rows(q, "q", n, hd);
  check_rows(out, "out", n, hd);
  TORCH_CHECK(out.size(1) == heads, "prefill_attention: head counts differ");
  TORCH_CHECK(block_size > 0 && block_size % 16 == 0, "prefill_attention: block_size must be a multiple of 16");
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(1) == kv_heads && k_cache.size(2) == hd && k_cache.size(3) == block_size &&
                  v_cache.size(0) == k_cache.size(0) * block_size && v_cache.size(2) == hd,
              "prefill_attention: the caches must be one layer's, bfloat16: k [blocks, kv heads, head_dim, "
              "block_size], v [slots, kv heads, head_dim]");
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.dim() == 2 && tables.is_contiguous() &&
                  tables.size(0) == static_cast<int64_t>(spans.size()),
              "prefill_attention: tables must be int32 [spans, blocks]");
#ifdef SOUVERAIN_BF16
  const int64_t width = tables.size(1), cache_blocks = k_cache.size(0);
  const int32_t* tp = tables.data_ptr<int32_t>();
  std::vector<Span> ss;
  for (const auto& [row, start, count] : spans) {
    check_span(row, count, n);
    const int64_t keys = start + count;
    TORCH_CHECK(start >= 0 && keys <= width * block_size, "prefill_attention: span at row ", row, " reaches key ",
                keys, ", past its block table");
    const int32_t* table = tp + static_cast<int64_t>(ss.size()) * width;
    for (int64_t b = 0; b < (keys + block_size - 1) / block_size; ++b) {
      TORCH_CHECK(table[b] >= 0 && table[b] < cache_blocks, "prefill_attention: block ", table[b], " not in the cache");
    }
    ss.push_back({row, count, start, keys, (keys + 31) / 32, 0});
  }
  const auto* kc = k_cache.data_ptr<bf16>();
  const auto* vc = v_cache.data_ptr<bf16>();
  const int64_t bs = block_size, block_stride = kv_heads * hd * bs;
  attend_spans_on(isa, q, out, kv_heads, ss, scale, [&](const Span& s, int64_t g, bf16* keys, bf16* values) {
    const int32_t* table = tp + (&s - ss.data()) * width;
    const bf16* kg = kc + g * hd * bs;
    auto value_row = [&](int64_t key) { return vc + ((table[key / bs] * bs + key % bs) * kv_heads + g) * hd; };
    // The cache is read in 32-key steps from blocks wherever the table puts them, too scattered for the
    // hardware's prefetchers: while block kb's keys are packed, the next block's keys and this block's
    // values (packed after all the keys) are fetched.
    pack_keys_cached(kg, block_stride, table, bs, s.keys, hd, keys, [&](int64_t kb) {
      for (int64_t key = (kb + 1) * 32; key < std::min(s.keys, (kb + 2) * 32); key += 16) {
        const char* base = reinterpret_cast<const char*>(kg + table[key / bs] * block_stride + key % bs);
        for (int64_t d = 0; d < hd; d += bs == 16 ? 2 : 1) _mm_prefetch(base + d * bs * 2, _MM_HINT_T0);
      }
      for (int64_t key = kb * 32; key < std::min(s.keys, (kb + 1) * 32); ++key) {
        const char* row = reinterpret_cast<const char*>(value_row(key));
        for (int64_t b = 0; b < hd * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
      }
    });
    pack_values(value_row, s.keys, hd, values);
  });
#endif
}

}  // namespace souverain
