// CPU kernels for the decode hot path, built on first use by souverain/kernels/__init__.py.
//
// Each one replaces a chain of small ATen ops (one memory pass each, one dispatch each) by a
// single pass. The bf16 variants round exactly where the PyTorch reference path rounds, so the
// two paths agree to the last bit (sums and exp aside). Parallel loops run on the kernels' own
// thread pool (pool.cpp).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "amx.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace souverain {

using at::BFloat16;
using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t W = fVec::size();
// Element-wise kernels split work across threads only above this many values.
constexpr int64_t kInlineWork = 1 << 16;

inline fVec loadv(const float* p) { return fVec::loadu(p); }
inline fVec loadv(const BFloat16* p) {
  fVec out;
  at::vec::load_to_float<BFloat16>(p, out);
  return out;
}
inline fVec loadv(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return fVec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
  return fVec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  float f[W];
  for (int64_t i = 0; i < W; ++i) f[i] = p[i];
  return fVec::loadu(f);
#endif
}

// Round to the storage type as an ATen op would (round to nearest even for bf16).
template <typename T> inline fVec round_to(const fVec& v) { return v; }
#if defined(CPU_CAPABILITY_AVX512) && defined(SOUVERAIN_BF16)
// The CPU's own rounding (vcvtneps2bf16, amx.h): one instruction where ATen's vector classes emulate it in several.
template <> inline fVec round_to<BFloat16>(const fVec& v) { return fVec(souverain::amx::round_bf16(v)); }
#else
template <> inline fVec round_to<BFloat16>(const fVec& v) {
  auto [lo, hi] = at::vec::convert_to_float<BFloat16>(at::vec::convert_from_float<BFloat16>(v, v));
  (void)hi;
  return lo;
}
#endif
template <typename T> inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// A float row to storage, n a multiple of W.
inline void store_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += W) fVec::loadu(src + i).store(dst + i);
}
inline void store_row(const float* src, BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
#if defined(CPU_CAPABILITY_AVX512) && defined(SOUVERAIN_BF16)
    _mm512_storeu_si512(dst + i, souverain::amx::to_bf16(_mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + W)));
#else
    at::vec::convert_from_float<BFloat16>(fVec::loadu(src + i), fVec::loadu(src + i + W)).store(dst + i);
#endif
  }
  for (; i < n; ++i) dst[i] = static_cast<BFloat16>(src[i]);
}

inline float to_float(float v) { return v; }
inline float to_float(BFloat16 v) { return static_cast<float>(v); }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------------
// Attention straight from the paged cache, for every query of a step: decode tokens and prefill rows
// alike, each query with its own block table row and key range [lo, hi) (keys read block by block
// through the table, no gathered copy). A query's result is a function of its own values and keys only,
// computed the same way whatever else is in the call: a token gets the same bits decoded, prefilled in
// one chunk or in several, alone or among other sequences (batch invariance).
//
// Layouts: k_cache [blocks, Hkv, hd, block_size] (each block's keys stored transposed, one
// contiguous tile per head, so a score is a sum of vector FMAs over dimensions with no
// horizontal reduction per key), v_cache [slots, Hkv, hd], a slot being block * block_size + offset.
// Work items are (sequence, kv head); the R = H / Hkv query heads sharing a kv head are computed
// together, so each key and value is read once; R and CH = hd / W are template parameters so
// the accumulators stay in registers.
//
// The values may come from the cache's int8 copy instead (`v_int8`, written beside the bf16 values by store_kv:
// each slot's head rounded to int8 on a scale of its own, max |v| / 127): half the bytes of the read that bounds
// this kernel at many streams, for a mean KL to fp32 no larger than bf16 values' (bench/accuracy.py --kv int8-v).
// A key's scale multiplies its probability (after the softmax's sum); the values' sums are otherwise the same.
struct DecodeArgs {
  int64_t h, hkv, hd, width, block_size;
  const int32_t* table;
  const int32_t* starts;
  const int32_t* ends;
  float scale;
  const float* v_scale;  // [slots, Hkv] with int8 values, else null
};

// Softmax over one query's scores sr[0, n), in place (exp(s - max)); returns their sum. The same
// operations in the same order for a query whatever shares its call (the maximum is exact in any order).
inline float softmax_row(float* sr, int64_t n) {
  fVec top(-INFINITY);
  int64_t j = 0;
  for (; j + W <= n; j += W) top = at::vec::maximum(top, fVec::loadu(sr + j));
  float lanes[W];
  top.store(lanes);
  float mx = -INFINITY;
  for (int64_t i = 0; i < W; ++i) mx = std::max(mx, lanes[i]);
  for (; j < n; ++j) mx = std::max(mx, sr[j]);
  fVec sumv(0.f);
  for (j = 0; j + W <= n; j += W) {
    const fVec e = (fVec::loadu(sr + j) - fVec(mx)).exp_u20();
    e.store(sr + j);
    sumv = sumv + e;
  }
  float sum = sumv.reduce_add();
  for (; j < n; ++j) {
    sr[j] = std::exp(sr[j] - mx);
    sum += sr[j];
  }
  return sum;
}

// NQ consecutive query rows s0 .. s0 + NQ - 1 of one sequence (they share s0's block table; NQ = 1 for a
// decode) and kv head g. Each row's arithmetic is a lone row's: its scores key by key as chains of FMAs
// over the dimensions, its softmax over its own keys [lo, hi), its values summed in key order; the rows
// only share the loads of the keys and the values' addresses.
template <typename T, typename V, int R, int CH, int NQ>
void attend_item(const DecodeArgs& a, const T* qp, const T* kp, const V* vp, T* op, int64_t s0, int64_t g,
                 std::vector<float>& scores, std::vector<const V*>& values, std::vector<float>& value_scales) {
  constexpr int64_t hd = CH * W;
  constexpr int RQ = R * NQ;
  const int64_t bs = a.block_size;
  int64_t lo = a.starts[s0], hi = a.ends[s0];
  for (int q = 1; q < NQ; ++q) {
    lo = std::min<int64_t>(lo, a.starts[s0 + q]);
    hi = std::max<int64_t>(hi, a.ends[s0 + q]);
  }
  const int64_t first = lo / bs, last = (hi - 1) / bs, span = (last - first + 1) * bs;
  const int32_t* blocks = a.table + s0 * a.width;
  float qf[RQ][hd];  // row q * R + r: query head g * R + r of row s0 + q
  for (int q = 0; q < NQ; ++q) {
    for (int r = 0; r < R; ++r) {
      const T* src = qp + ((s0 + q) * a.h + g * R + r) * hd;
      for (int c = 0; c < CH; ++c) (loadv(src + c * W) * fVec(a.scale)).store(&qf[q * R + r][c * W]);
    }
  }
  // Scores for every slot of the blocks in reach, W keys per vector (the few outside a row's range unused).
  scores.resize(RQ * span);
  constexpr int64_t line = 64 / sizeof(T);  // values per cache line
  auto tile_of = [&](int64_t b) { return kp + (static_cast<int64_t>(blocks[b]) * a.hkv + g) * hd * bs; };
  // NV vectors of W keys at a time (NV * RQ independent chains of FMAs: with RQ = 3 alone, each FMA
  // waited for the one before it), each key's score the same chain over the dimensions either way.
  constexpr int NV = RQ >= 8 ? 1 : RQ >= 4 ? 2 : 3;
  constexpr int64_t kStep = 8;  // dimensions between prefetches
  const int64_t per_block = bs / W, vectors = (last - first + 1) * per_block;
  auto column = [&](int64_t v) { return tile_of(first + v / per_block) + v % per_block * W; };
  // Blocks lie anywhere in the pool: the tiles of the group two ahead are fetched while one is computed.
  auto starting = [&](int64_t v) { return v < vectors && v % per_block == 0 ? column(v) : nullptr; };
  for (int64_t v = 0; v < 2 * NV; ++v) {
    if (const T* t = starting(v)) {
      for (int64_t k = 0; k < hd * bs; k += line) __builtin_prefetch(t + k);
    }
  }
  for (int64_t v0 = 0; v0 < vectors; v0 += NV) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, vectors - v0));
    const T* col[NV];
    const T* next[NV];
    for (int j = 0; j < NV; ++j) {
      col[j] = column(v0 + std::min(j, nv - 1));  // (a short last group repeats its last vector)
      next[j] = starting(v0 + 2 * NV + j);
    }
    fVec acc[NV][RQ];
    for (int j = 0; j < NV; ++j)
      for (int i = 0; i < RQ; ++i) acc[j][i] = fVec(0.f);
    for (int64_t d0 = 0; d0 < hd; d0 += kStep) {
      for (int j = 0; j < NV; ++j) {
        if (next[j] != nullptr) {
          for (int64_t k = d0 * bs; k < (d0 + kStep) * bs; k += line) __builtin_prefetch(next[j] + k);
        }
      }
#pragma GCC unroll 8
      for (int64_t d = d0; d < d0 + kStep; ++d) {
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) {
          const fVec k = loadv(col[j] + d * bs);
#pragma GCC unroll 8
          for (int i = 0; i < RQ; ++i) acc[j][i] = at::vec::fmadd(fVec(qf[i][d]), k, acc[j][i]);
        }
      }
    }
    for (int j = 0; j < nv; ++j)
      for (int i = 0; i < RQ; ++i) acc[j][i].store(scores.data() + i * span + (v0 + j) * W);
  }
  // Where each key's values are (every slot of the blocks in reach), and with int8 values their scales.
  constexpr bool int8_values = std::is_same_v<V, int8_t>;
  values.resize(span);
  if (int8_values) value_scales.resize(span);
  for (int64_t b = first; b <= last; ++b) {
    const int64_t slot0 = static_cast<int64_t>(blocks[b]) * bs;
    const V* base = vp + (slot0 * a.hkv + g) * hd;
    for (int64_t o = 0; o < bs; ++o) values[(b - first) * bs + o] = base + o * a.hkv * hd;
    if constexpr (int8_values) {
      for (int64_t o = 0; o < bs; ++o) value_scales[(b - first) * bs + o] = a.v_scale[(slot0 + o) * a.hkv + g];
    }
  }
  constexpr int64_t vline = 64 / sizeof(V);  // values per cache line
  constexpr int64_t ahead = 12;  // value rows fetched this many keys ahead
  for (int q = 0; q < NQ; ++q) {
    const int64_t j0 = a.starts[s0 + q] - first * bs, j1 = a.ends[s0 + q] - first * bs;
    float total[R];
    for (int r = 0; r < R; ++r) total[r] = softmax_row(scores.data() + (q * R + r) * span + j0, j1 - j0);
    if constexpr (int8_values) {  // each key's probability times its values' scale
      for (int r = 0; r < R; ++r) {
        float* sr = scores.data() + (q * R + r) * span;
        int64_t j = j0;
        for (; j + W <= j1; j += W) (fVec::loadu(sr + j) * fVec::loadu(value_scales.data() + j)).store(sr + j);
        for (; j < j1; ++j) sr[j] *= value_scales[j];
      }
    }
    fVec out[R][CH];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CH; ++c) out[r][c] = fVec(0.f);
    if (q == 0) {
      for (int64_t j = j0; j < std::min(j1, j0 + ahead); ++j) {
        for (int64_t k = 0; k < hd; k += vline) __builtin_prefetch(values[j] + k);
      }
    }
    const float* sq = scores.data() + q * R * span;
    auto accumulate = [&](int64_t j) {
      const V* vrow = values[j];
      for (int c = 0; c < CH; ++c) {
        const fVec v = loadv(vrow + c * W);
        for (int r = 0; r < R; ++r) out[r][c] = at::vec::fmadd(fVec(sq[r * span + j]), v, out[r][c]);
      }
    };
    int64_t j = j0;
    // The rows of a run read the same values: the first fetches them, in a loop of its own (with the test
    // inside the one loop, GCC kept out[][] on the stack: a load and a store around every FMA).
    if (q == 0) {
      for (; j + ahead < j1; ++j) {
        for (int64_t k = 0; k < hd; k += vline) __builtin_prefetch(values[j + ahead] + k);
        accumulate(j);
      }
    }
    for (; j < j1; ++j) accumulate(j);
    for (int r = 0; r < R; ++r) {
      float row[hd];
      const fVec inv(1.f / total[r]);
      for (int c = 0; c < CH; ++c) (out[r][c] * inv).store(row + c * W);
      store_row(row, op + ((s0 + q) * a.h + g * R + r) * hd, hd);
    }
  }
}

// Work items: runs of up to kRun rows of one span (where the accumulators fit: R <= 4), else single rows;
// taken in the order first, last, second, second to last... so each thread's contiguous share of the
// items holds as many long rows (many keys) as short ones. Every item is computed whole by one thread.
constexpr int kRun = 4;

template <typename T, typename V, int R, int CH>
void decode_all(const DecodeArgs& a, const T* qp, const T* kp, const V* vp, T* op, int64_t n,
                const std::vector<std::pair<int64_t, int64_t>>& runs) {
  std::vector<std::pair<int64_t, int64_t>> items;  // (first row, rows)
  size_t next = 0;  // runs are in row order
  for (int64_t s = 0; s < n;) {
    if (next < runs.size() && runs[next].first == s) {
      const int64_t end = s + runs[next++].second;
      if (R <= 4) {
        for (; s + kRun <= end; s += kRun) items.emplace_back(s, kRun);
      }
      for (; s < end; ++s) items.emplace_back(s, 1);
    } else {
      items.emplace_back(s++, 1);
    }
  }
  const int64_t m = static_cast<int64_t>(items.size());
  souverain::parallel_for(0, m * a.hkv, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> scores, value_scales;
    std::vector<const V*> values;
    for (int64_t unit = begin; unit < stop; ++unit) {
      const int64_t i = unit / a.hkv, pick = i % 2 == 0 ? i / 2 : m - 1 - i / 2, g = unit % a.hkv;
      const auto [s0, rows] = items[pick];
      if constexpr (R <= 4) {
        if (rows == kRun) {
          attend_item<T, V, R, CH, kRun>(a, qp, kp, vp, op, s0, g, scores, values, value_scales);
          continue;
        }
      }
      attend_item<T, V, R, CH, 1>(a, qp, kp, vp, op, s0, g, scores, values, value_scales);
    }
  });
}

template <typename T, typename V, int CH>
bool decode_rep(const DecodeArgs& a, const T* qp, const T* kp, const V* vp, T* op, int64_t n, int64_t rep,
                const std::vector<std::pair<int64_t, int64_t>>& runs) {
  switch (rep) {
    case 1: decode_all<T, V, 1, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 2: decode_all<T, V, 2, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 3: decode_all<T, V, 3, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 4: decode_all<T, V, 4, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 5: decode_all<T, V, 5, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 6: decode_all<T, V, 6, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 7: decode_all<T, V, 7, CH>(a, qp, kp, vp, op, n, runs); return true;
    case 8: decode_all<T, V, 8, CH>(a, qp, kp, vp, op, n, runs); return true;
    default: return false;
  }
}

template <typename T, typename V>
bool decode_dispatch(const DecodeArgs& a, const T* qp, const T* kp, const V* vp, T* op, int64_t n,
                     const std::vector<std::pair<int64_t, int64_t>>& runs) {
  const int64_t rep = a.h / a.hkv;
  switch (a.hd / W) {
    case 2: return decode_rep<T, V, 2>(a, qp, kp, vp, op, n, rep, runs);
    case 4: return decode_rep<T, V, 4>(a, qp, kp, vp, op, n, rep, runs);
    case 8: return decode_rep<T, V, 8>(a, qp, kp, vp, op, n, rep, runs);
    case 16: return decode_rep<T, V, 16>(a, qp, kp, vp, op, n, rep, runs);
    default: return false;
  }
}

// The values' int8 copy, where given: beside a bfloat16 cache, v_int8 shaped as v_cache, v_scale [slots, Hkv].
void check_int8_values(const std::optional<torch::Tensor>& v_int8, const std::optional<torch::Tensor>& v_scale,
                       const torch::Tensor& v_cache, at::ScalarType dtype) {
  TORCH_CHECK(v_int8.has_value() == v_scale.has_value(), "v_int8 and v_scale go together");
  if (!v_int8) return;
  check_cpu(*v_int8, "v_int8");
  check_cpu(*v_scale, "v_scale");
  TORCH_CHECK(dtype == at::kBFloat16 && v_int8->scalar_type() == at::kChar && v_scale->scalar_type() == at::kFloat &&
                  v_int8->sizes() == v_cache.sizes() && v_scale->dim() == 2 && v_scale->size(0) == v_cache.size(0) &&
                  v_scale->size(1) == v_cache.size(1),
              "int8 values: a bfloat16 cache, v_int8 int8 shaped as v_cache, v_scale float32 [slots, Hkv]");
}

bool decode_supported(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t block_size) {
  const int64_t ch = head_dim / W, rep = n_kv_heads > 0 ? n_heads / n_kv_heads : 0;
  return head_dim % W == 0 && (ch == 2 || ch == 4 || ch == 8 || ch == 16) && n_heads % n_kv_heads == 0 &&
         rep >= 1 && rep <= 8 && block_size % W == 0;
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor k_start, torch::Tensor k_end,
                                     int64_t block_size, double scale, std::vector<std::pair<int64_t, int64_t>> runs,
                                     std::optional<torch::Tensor> v_int8, std::optional<torch::Tensor> v_scale) {
  for (auto* t : {&q, &k_cache, &v_cache, &block_table, &k_start, &k_end}) check_cpu(*t, "paged_decode_attention input");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 3,
              "q [N, H, hd], k_cache [blocks, Hkv, hd, block_size], v_cache [slots, Hkv, hd]");
  TORCH_CHECK(k_cache.size(1) == v_cache.size(1) && k_cache.size(2) == v_cache.size(2) && k_cache.size(3) == block_size &&
              k_cache.size(0) * block_size == v_cache.size(0), "k_cache [blocks, Hkv, hd, block_size] and v_cache [slots, Hkv, hd] disagree");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "one dtype for q, k, v");
  TORCH_CHECK(q.size(2) == v_cache.size(2), "head_dim disagrees");
  TORCH_CHECK(decode_supported(q.size(1), v_cache.size(1), q.size(2), block_size), "unsupported head or block shape");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && k_start.scalar_type() == at::kInt && k_end.scalar_type() == at::kInt,
              "block_table, k_start, k_end must be int32");
  TORCH_CHECK(block_table.size(0) == q.size(0) && k_start.size(0) == q.size(0) && k_end.size(0) == q.size(0),
              "one block table row and key range per query");
  check_int8_values(v_int8, v_scale, v_cache, q.scalar_type());
  auto out = torch::empty_like(q);
  DecodeArgs a{q.size(1), v_cache.size(1), q.size(2), block_table.size(1), block_size,
               block_table.data_ptr<int32_t>(), k_start.data_ptr<int32_t>(), k_end.data_ptr<int32_t>(),
               static_cast<float>(scale), v_scale ? v_scale->data_ptr<float>() : nullptr};
  const int64_t n = q.size(0);
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(a.starts[i] >= 0 && a.starts[i] < a.ends[i], "empty key range");
  int64_t covered = 0;  // rows before the previous run's end
  for (const auto& [row, count] : runs) {
    TORCH_CHECK(row >= covered && count > 0 && row + count <= n, "run (", row, ", ", count, ") outside the ", n,
                " rows, or not after the run before it");
    covered = row + count;
    TORCH_CHECK(std::equal(a.table + row * a.width, a.table + (row + 1) * a.width,
                           a.table + (row + count - 1) * a.width), "the rows of a run must share one block table");
  }
  if (v_int8) {
    decode_dispatch<BFloat16, int8_t>(a, q.data_ptr<BFloat16>(), k_cache.data_ptr<BFloat16>(),
                                      v_int8->data_ptr<int8_t>(), out.data_ptr<BFloat16>(), n, runs);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_dispatch<BFloat16, BFloat16>(a, q.data_ptr<BFloat16>(), k_cache.data_ptr<BFloat16>(),
                                        v_cache.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), n, runs);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode_attention takes bfloat16 or float32");
    decode_dispatch<float, float>(a, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                  out.data_ptr<float>(), n, runs);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm as the reference computes it: in fp32, rounded to the input dtype, then times the weight. With r,
// the rows are the residual stream's sum x + r first, rounded to the dtype as ATen's add rounds it, and
// written to h: a residual add and the norm after it in one pass (add_rms_norm); without w, only the sum
// (add_rows). The same bits as the separate ops.
template <typename T>
void norm_rows_impl(const torch::Tensor& x, const torch::Tensor* r, const torch::Tensor* w, double eps,
                    torch::Tensor* h, torch::Tensor* out) {
  const int64_t rows = x.numel() / x.size(-1), dim = x.size(-1);
  const T* xp = x.data_ptr<T>();
  const T* rp = r ? r->data_ptr<T>() : nullptr;
  const T* wp = w ? w->data_ptr<T>() : nullptr;
  T* hp = h ? h->data_ptr<T>() : nullptr;
  T* op = out ? out->data_ptr<T>() : nullptr;
  // Small inputs (a decode step's rows) run on the calling thread: waking the pool costs more.
  souverain::parallel_for(0, rows, std::max<int64_t>(1, kInlineWork / dim), [&](int64_t begin, int64_t end) {
    std::vector<float> y(dim);
    for (int64_t row = begin; row < end; ++row) {
      fVec ssv(0.f);
      for (int64_t d = 0; d < dim; d += W) {
        fVec v = loadv(xp + row * dim + d);
        if (rp) v = round_to<T>(v + loadv(rp + row * dim + d));
        v.store(y.data() + d);
        ssv = at::vec::fmadd(v, v, ssv);
      }
      if (hp) store_row(y.data(), hp + row * dim, dim);
      if (wp == nullptr) continue;
      const float inv = 1.f / std::sqrt(ssv.reduce_add() / static_cast<float>(dim) + static_cast<float>(eps));
      const fVec invv(inv);
      for (int64_t d = 0; d < dim; d += W) {
        (loadv(wp + d) * round_to<T>(loadv(y.data() + d) * invv)).store(y.data() + d);
      }
      store_row(y.data(), op + row * dim, dim);
    }
  });
}

// norm_rows_impl in x's dtype (bfloat16 or float32).
static void norm_rows(const torch::Tensor& x, const torch::Tensor* r, const torch::Tensor* w, double eps,
                      torch::Tensor* h, torch::Tensor* out) {
  if (x.scalar_type() == at::kBFloat16) {
    norm_rows_impl<BFloat16>(x, r, w, eps, h, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm and the adds take bfloat16 or float32");
    norm_rows_impl<float>(x, r, w, eps, h, out);
  }
}

static void check_weight(const torch::Tensor& x, const torch::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [dim] in x's dtype");
}

static void check_add(const torch::Tensor& x, const torch::Tensor& r) {
  check_cpu(x, "x");
  check_cpu(r, "r");
  TORCH_CHECK(x.sizes() == r.sizes() && x.scalar_type() == r.scalar_type(), "x and r must have one shape and dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "add takes bfloat16 or float32");
  TORCH_CHECK(x.dim() > 0 && x.size(-1) % W == 0, "the rows' length must be a multiple of ", W);
}

torch::Tensor add_rows(torch::Tensor x, torch::Tensor r) {
  check_add(x, r);
  auto h = torch::empty_like(x);
  norm_rows(x, &r, nullptr, 0., &h, nullptr);
  return h;
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor r, torch::Tensor weight,
                                                      double eps) {
  check_add(x, r);
  check_weight(x, weight);
  auto h = torch::empty_like(x), out = torch::empty_like(x);
  norm_rows(x, &r, &weight, eps, &h, &out);
  return {h, out};
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_cpu(x, "x");
  check_weight(x, weight);
  TORCH_CHECK(x.size(-1) % W == 0, "dim must be a multiple of ", W);
  auto out = torch::empty_like(x);
  norm_rows(x, nullptr, &weight, eps, nullptr, &out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's gate: silu(a) * b, each op rounded as ATen rounds it. Rows of n values; a and b rows
// start every `stride` values (a fused [gate | up] projection has a = gu, b = gu + n, stride 2n).
template <typename T>
void silu_mul_rows(const T* ap, const T* bp, T* op, int64_t rows, int64_t n, int64_t stride) {
  // An exp and a division per value, so the threads split it from fewer values than the other
  // kernels: a 32-row decode step of SmolLM2 (49k values) took 53 us on one thread, 30-46 on two.
  souverain::parallel_for(0, rows * n, kInlineWork / 8, [&](int64_t begin, int64_t end) {
    float buf[2 * W];
    const fVec one(1.f);
    int64_t i = begin;
    while (i < end) {
      const int64_t r = i / n, col = i % n, stop = std::min(end - i, n - col);
      const T* a = ap + r * stride + col;
      const T* b = bp + r * stride + col;
      T* o = op + i;
      int64_t k = 0;
      for (; k + 2 * W <= stop; k += 2 * W) {
        for (int64_t h = 0; h < 2; ++h) {
          const fVec x = loadv(a + k + h * W);
          const fVec sig = round_to<T>(x / (one + x.neg().exp()));
          (sig * loadv(b + k + h * W)).store(buf + h * W);
        }
        store_row(buf, o + k, 2 * W);
      }
      for (; k < stop; ++k) {
        const float x = to_float(a[k]);
        o[k] = static_cast<T>(round_to<T>(x / (1.f + std::exp(-x))) * to_float(b[k]));
      }
      i += stop;
    }
  });
}

template <typename T>
void silu_mul_typed(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out, int64_t rows, int64_t n,
                    int64_t stride) {
  silu_mul_rows<T>(a.data_ptr<T>(), b.data_ptr<T>(), out.data_ptr<T>(), rows, n, stride);
}

torch::Tensor silu_mul(torch::Tensor a, torch::Tensor b) {
  check_cpu(a, "a");
  check_cpu(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match");
  auto out = torch::empty_like(a);
  const int64_t n = a.numel();
  if (a.scalar_type() == at::kBFloat16) {
    silu_mul_typed<BFloat16>(a, b, out, 1, n, n);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "silu_mul takes bfloat16 or float32");
    silu_mul_typed<float>(a, b, out, 1, n, n);
  }
  return out;
}

// gu [..., 2n] (gate then up) -> silu(gate) * up [..., n].
torch::Tensor swiglu(torch::Tensor gu) {
  check_cpu(gu, "gu");
  TORCH_CHECK(gu.size(-1) % 2 == 0, "gu's last dimension must be even");
  const int64_t n = gu.size(-1) / 2, rows = gu.numel() / gu.size(-1);
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gu.options());
  if (gu.scalar_type() == at::kBFloat16) {
    silu_mul_rows<BFloat16>(gu.data_ptr<BFloat16>(), gu.data_ptr<BFloat16>() + n, out.data_ptr<BFloat16>(), rows, n, 2 * n);
  } else {
    TORCH_CHECK(gu.scalar_type() == at::kFloat, "swiglu takes bfloat16 or float32");
    silu_mul_rows<float>(gu.data_ptr<float>(), gu.data_ptr<float>() + n, out.data_ptr<float>(), rows, n, 2 * n);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (rotate-half layout) on x [R, heads, hd] with cos/sin [R, hd]:
// x * cos + rotate_half(x) * sin, rounded per op as the reference path rounds.
template <typename T>
void rope_impl(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out) {
  const int64_t rows = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2, row_stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  souverain::parallel_for(0, rows, std::max<int64_t>(1, kInlineWork / (heads * hd)), [&](int64_t begin, int64_t end) {
    std::vector<float> y(hd);
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * hd;
      const T* sn = sp + r * hd;
      for (int64_t hh = 0; hh < heads; ++hh) {
        const int64_t base = (r * heads + hh) * hd;
        const T* v = xp + r * row_stride + hh * hd;
        for (int64_t d = 0; d < half; d += W) {  // first half: x * cos - x[half:] * sin
          (round_to<T>(loadv(v + d) * loadv(c + d)) + round_to<T>(loadv(v + half + d).neg() * loadv(sn + d)))
              .store(y.data() + d);
        }
        for (int64_t d = half; d < hd; d += W) {  // second half: x * cos + x[:half] * sin
          (round_to<T>(loadv(v + d) * loadv(c + d)) + round_to<T>(loadv(v + d - half) * loadv(sn + d)))
              .store(y.data() + d);
        }
        store_row(y.data(), op + base, hd);
      }
    }
  });
}

// x's rows may lie apart (q or k sliced from a fused projection); each row's heads are contiguous.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  for (auto* t : {&cos, &sin}) check_cpu(*t, "rope input");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be on the CPU with contiguous rows [R, heads, hd]");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && x.size(2) % 2 == 0, "x [R, heads, hd], cos/sin [R, hd]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "one dtype for x, cos, sin");
  TORCH_CHECK(x.size(2) % (2 * W) == 0, "head_dim must be a multiple of ", 2 * W);
  auto out = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kBFloat16) {
    rope_impl<BFloat16>(x, cos, sin, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rope takes bfloat16 or float32");
    rope_impl<float>(x, cos, sin, out);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing a step's keys and values into the paged cache (keys as [blocks, Hkv, hd, bs] tiles).
// With an int8 copy of the values (paged_decode_attention's `v_int8`): each slot's head rounded to the nearest
// int8 step of max |v| / 127 (v * (127 / max |v|), ties to even; an all-zero head: scale 0, codes 0).
inline void quantise_values(const BFloat16* src, int64_t hd, int8_t* dst, float* scale) {
  fVec top(0.f);
  for (int64_t d = 0; d < hd; d += W) top = at::vec::maximum(top, loadv(src + d).abs());
  float mx = 0.f, lanes[W];
  top.store(lanes);
  for (int64_t l = 0; l < W; ++l) mx = std::max(mx, lanes[l]);
  const fVec inv(mx > 0.f ? 127.f / mx : 0.f);
  *scale = mx / 127.f;
  for (int64_t d = 0; d < hd; d += W) {  // hd is a multiple of W (decode_supported)
    const fVec codes = (loadv(src + d) * inv).round();  // whole numbers in [-127, 127]
#if defined(CPU_CAPABILITY_AVX512)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(codes)));
#else
    float f[W];
    codes.store(f);
    for (int64_t i = 0; i < W; ++i) dst[d + i] = static_cast<int8_t>(f[i]);
#endif
  }
}

template <typename T>
void store_kv_impl(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
                   const torch::Tensor& slots, int8_t* v8, float* v_scale) {
  const int64_t n = k.size(0), hkv = k.size(1), hd = k.size(2), bs = k_cache.size(3);
  const int64_t k_stride = k.stride(0), v_stride = v.stride(0);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  souverain::parallel_for(0, n, std::max<int64_t>(1, kInlineWork / (hkv * hd)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = sp[i], block = slot / bs, off = slot % bs;
      std::copy(vp + i * v_stride, vp + i * v_stride + hkv * hd, vc + slot * hkv * hd);
      if constexpr (std::is_same_v<T, BFloat16>) {
        if (v8 != nullptr) {
          for (int64_t g = 0; g < hkv; ++g) {
            quantise_values(vp + i * v_stride + g * hd, hd, v8 + (slot * hkv + g) * hd, v_scale + slot * hkv + g);
          }
        }
      }
      for (int64_t g = 0; g < hkv; ++g) {
        const T* src = kp + i * k_stride + g * hd;
        T* tile = kc + (block * hkv + g) * hd * bs + off;
        for (int64_t d = 0; d < hd; ++d) tile[d * bs] = src[d];
      }
    }
  });
}

// k's and v's rows may lie apart (sliced from a fused projection); each row's heads are contiguous.
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
              std::optional<torch::Tensor> v_int8, std::optional<torch::Tensor> v_scale) {
  for (auto* t : {&k_cache, &v_cache, &slots}) check_cpu(*t, "store_kv input");
  for (auto* t : {&k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2),
                "k and v must be on the CPU with contiguous rows [N, Hkv, hd]");
  }
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k_cache.dim() == 4 && v_cache.dim() == 3,
              "k, v [N, Hkv, hd]; k_cache [blocks, Hkv, hd, bs]; v_cache [slots, Hkv, hd]");
  TORCH_CHECK(k_cache.size(1) == k.size(1) && k_cache.size(2) == k.size(2) && v_cache.size(1) == k.size(1) &&
              v_cache.size(2) == k.size(2) && k_cache.size(0) * k_cache.size(3) == v_cache.size(0), "cache shapes disagree");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == k.size(0), "slots: int64 [N]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
              k.scalar_type() == v.scalar_type(), "one dtype for k, v and the caches");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.size(0); ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < v_cache.size(0), "slot out of range");
  check_int8_values(v_int8, v_scale, v_cache, k.scalar_type());
  int8_t* v8 = v_int8 ? v_int8->data_ptr<int8_t>() : nullptr;
  float* vs = v_scale ? v_scale->data_ptr<float>() : nullptr;
  if (k.scalar_type() == at::kBFloat16) {
    store_kv_impl<BFloat16>(k, v, k_cache, v_cache, slots, v8, vs);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kFloat, "store_kv takes bfloat16 or float32");
    store_kv_impl<float>(k, v, k_cache, v_cache, slots, nullptr, nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling: the index of each row's maximum, the first one on ties, NaN above all (as argmax).
// One vector pass keeps each lane's maximum and where it first saw it (indices as floats: exact below 2^24,
// which argmax_rows checks); the lanes then give the smallest index holding the maximum. A row holding a NaN
// (no lane compares greater than it) is scanned again for its first NaN.
template <typename T>
void argmax_impl(const T* xp, int64_t* op, int64_t rows, int64_t n) {
  souverain::parallel_for(0, rows, std::max<int64_t>(1, kInlineWork / n), [&](int64_t begin, int64_t end) {
    float lane_at[W];
    for (int64_t l = 0; l < W; ++l) lane_at[l] = static_cast<float>(l);
    const fVec step(static_cast<float>(W));
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * n;
      fVec mx(-INFINITY), at = fVec::loadu(lane_at), pos = at, nan(0.f);
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const fVec v = loadv(row + i);
        const fVec gt = v > mx;
        mx = fVec::blendv(mx, v, gt);
        at = fVec::blendv(at, pos, gt);
        nan = nan | (v != v);
        pos = pos + step;
      }
      float mxs[W], ats[W], nans[W];
      mx.store(mxs);
      at.store(ats);
      nan.store(nans);
      float best = -INFINITY;
      int64_t where = 0;
      bool seen_nan = false;
      for (int64_t l = 0; l < W; ++l) {
        seen_nan = seen_nan || nans[l] != 0.f;  // an all-ones bit pattern: a NaN itself
        const auto a = static_cast<int64_t>(ats[l]);
        if (mxs[l] > best || (mxs[l] == best && a < where)) {
          best = mxs[l];
          where = a;
        }
      }
      for (int64_t j = i; j < n; ++j) {
        const float x = to_float(row[j]);
        seen_nan = seen_nan || std::isnan(x);
        if (x > best) {
          best = x;
          where = j;
        }
      }
      if (seen_nan) {
        for (int64_t j = 0; j < n; ++j) {
          if (std::isnan(to_float(row[j]))) {
            where = j;
            break;
          }
        }
      }
      op[r] = where;
    }
  });
}

torch::Tensor argmax_rows(torch::Tensor x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.size(1) > 0,
              "x: float32 or bfloat16 [R, V]");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 24), "argmax_rows: rows of under 2^24 values");
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty({rows}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kBFloat16) {
    argmax_impl<BFloat16>(x.data_ptr<BFloat16>(), out.data_ptr<int64_t>(), rows, n);
  } else {
    argmax_impl<float>(x.data_ptr<float>(), out.data_ptr<int64_t>(), rows, n);
  }
  return out;
}

}  // namespace souverain

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace souverain;
  namespace py = pybind11;
  m.def("vector_width", [] { return W; }, "floats per SIMD vector: row lengths must be multiples of it");
  m.def("decode_supported", &decode_supported, "whether paged_decode_attention takes these shapes");
  m.def("paged_decode_attention", &paged_decode_attention, "attention of each query row over its keys in a paged KV "
        "cache; runs: (first row, rows) of consecutive rows of one sequence, computed together",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("k_start"),
        py::arg("k_end"), py::arg("block_size"), py::arg("scale"),
        py::arg("runs") = std::vector<std::pair<int64_t, int64_t>>{}, py::arg("v_int8") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm");
  m.def("add_rows", &add_rows, "x + r, rounded as ATen's add rounds it");
  m.def("add_rms_norm", &add_rms_norm, "(h, RMSNorm(h)) for h = x + r: a residual add and the next norm in one pass");
  m.def("store_kv", &store_kv, "write keys and values into the paged cache (and the values' int8 copy, if given)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("v_int8") = py::none(), py::arg("v_scale") = py::none());
  m.def("argmax_rows", &argmax_rows, "argmax of each row of a float32 or bfloat16 matrix");
  m.def("silu_mul", &silu_mul, "silu(a) * b");
  m.def("swiglu", &swiglu, "silu(gate) * up from a fused [gate | up] tensor");
  m.def("rope", &rope, "rotary embedding, rotate-half layout");
  m.def("amx_available", &amx_available, "whether amx_linear runs here (an AMX CPU, and the OS grants the tiles)");
  m.def("amx_linear", &amx_linear, "x [M, K] bf16 times a weight packed by pack_tiles, as x @ w.T; glu: "
        "silu(gate) * up of a fused [gate | up] weight", py::arg("x"), py::arg("packed"), py::arg("glu") = false);
  m.def("bf16_supported", &bf16_supported, "whether q4_linear_bf16 runs here on isa's products (1024: AMX tiles, "
        "granted by the OS; 512: AVX-512 BF16)", py::arg("isa"));
  m.def("q4_linear_bf16", &q4_linear_bf16, "x [M, K] bf16 times q4_linear's int4 weight (pack_q4; N a multiple of "
        "32), dequantised to bf16, on AMX tiles (isa 1024) or AVX-512 BF16 (512): fp32 sums over all of K, bf16 "
        "out; glu: silu(gate) * up of a fused [gate | up] weight", py::arg("x"), py::arg("codes"), py::arg("sz"),
        py::arg("glu") = false, py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  m.def("prefill_supported", &prefill_supported, "whether prefill_attention runs here for these shapes on isa's "
        "products (1024: AMX tiles, 512: AVX-512 BF16)", py::arg("n_heads"), py::arg("n_kv_heads"),
        py::arg("head_dim"), py::arg("isa"));
  m.def("prefill_attention", &prefill_attention, "causal attention of chunks starting their sequences, into out",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("spans"), py::arg("scale"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_cached", &prefill_attention_cached,
        "causal attention of chunks continuing their sequences, every key read from one layer's paged cache "
        "(this step's keys stored first); spans are (row, cached keys, rows)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("spans"), py::arg("tables"), py::arg("block_size"),
        py::arg("scale"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  m.def("q4_supported", &q4_supported, "whether q4_linear's instructions for isa (1024: AMX tiles, 512: AVX-512 "
        "VNNI, 256: AVX2) run here");
  m.def("q4_linear", &q4_linear, "x [M, K] bf16 (quantised to 11 bits per 32 values, two int8 parts) times an int4 "
        "weight packed by pack_q4, as x @ w.T (fp32: a float32 output)", py::arg("x"), py::arg("codes"),
        py::arg("sz"), py::arg("isa"), py::arg("fp32") = false, py::call_guard<py::gil_scoped_release>());
  m.def("q8_linear", &q8_linear, "x [M, K] bf16 (quantised per row to 11 bits) times an int8 weight packed by "
        "pack_q8, as x @ w.T (fp32: a float32 output)", py::arg("x"), py::arg("codes"), py::arg("scales"),
        py::arg("isa"), py::arg("fp32") = false, py::call_guard<py::gil_scoped_release>());
  bind_decoder(m);
}
