// int4 (and int8) weights times int8-quantised activations, for CPUs without AMX (and AMX CPUs' decode).
//
// The scheme of llama.cpp's Q4_1 x Q8_1 dot products: each row of x is quantised per block of 32
// values to int8 (scale amax/127, round to nearest even), the products of the 4-bit codes and the
// int8 values are summed exactly in int32 by the CPU's integer dot-product instruction, and each
// block's sum is scaled once in fp32:
//   y[n] = sum over blocks b, in order: s[n,b] * sa[b] * (sum q*a - 8 * sum a) + z[n,b] * sa[b] * sum a
// which is x's dequantised block times the weight's dequantised block, w = (q - 8) * s + z. The
// integer sums are exact and the fp32 steps run in the same order for every row, whatever the number
// of rows in the call or their neighbours: a row's result is the same alone or in a batch.
//
// Layout (`pack_q4` in tiles.py): tiles of 16 output rows. Per tile and K-block: 4 x 64 bytes of
// codes, byte 4j + i of part t holds row j's codes k = 4t + i (low nibble) and 16 + 4t + i (high
// nibble), so one 64-byte load gives, after a mask or a shift, the 4 consecutive codes of each of 16
// rows that `vpdpbusd` (AVX-512 VNNI) multiplies with 4 broadcast activation bytes into 16 int32
// lanes; then [2, 16] bf16 scales and zeros. AVX2 has no VNNI: `vpmaddubsw` + `vpmaddwd` make the same
// int32 sums (no saturation: 2 * 15 * 127 < 32767), 8 rows per register.
//
// `q8_linear` is the same for int8 weights with one scale per output row (the output projection, whose
// logits want more than 4 bits): codes w + 128 in 8 parts of 64 bytes per tile and block, no unpacking.
// The output is rounded to bf16 here (to nearest even), not written in fp32 and converted.
//
// isa 1024 (the `amx` backend): more than 4 rows go through AMX tiles (`tiles_amx`: `tdpbsud` makes the
// same exact block sums, the fp32 steps are the same instructions), fewer through AVX-512 VNNI: one model
// for every row count, where the AMX products used to dequantise to bf16 (another model than decode's).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "amx.h"
#include "kernels.h"

namespace souverain {
namespace {

constexpr int64_t kRows = 16;       // output rows per tile
constexpr int64_t kBlock = 32;      // K values per scale
constexpr int64_t kRowBlock = 64;   // x rows kept in L2 while a thread's tiles pass
constexpr int kGroup = 4;           // x rows sharing one unpacking of the codes
constexpr int64_t kIsaAmx = 1024;   // AMX tiles for more than kGroup rows, AVX-512 VNNI for fewer

// x's rows, quantised: codes [M, K] int8, and per row and block the scale sa, the sum of the codes,
// and sa times that sum. With two parts (`fine`), each row is followed by its residual's: x - sa * q,
// quantised the same way per block (rows r * 2 and r * 2 + 1), so x is read to ~15 bits instead of 8.
struct Quantised {
  std::vector<int8_t> q;
  std::vector<float> scale, zterm;
  std::vector<int32_t> sum;
};

// One block of 32 values: codes round(v * 127 / amax), the scale amax / 127 and the codes' sum; the
// residual v - scale * code into `rest` if given.
inline void quantise_block(const float* v, int8_t* q, float& scale, float& zterm, int32_t& sum, float* rest) {
  float amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float sa = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * inv));
    q[i] = static_cast<int8_t>(c);
    total += c;
    if (rest) rest[i] = v[i] - sa * static_cast<float>(c);
  }
  scale = sa;
  sum = total;
  zterm = sa * static_cast<float>(total);
}

// The same, 32 values at a time: the same bits (the maximum is exact, the scale, products and residual
// are the same IEEE operations, cvtps rounds to nearest even as nearbyint does, and a NaN is skipped by
// the maximum as std::max skips it).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void quantise_block_avx512(
    __m512& v0, __m512& v1, int8_t* q, float& scale, float& zterm, int32_t& sum, bool rest) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 top = _mm512_max_ps(_mm512_and_ps(v0, sign), _mm512_setzero_ps());
  top = _mm512_max_ps(_mm512_and_ps(v1, sign), top);
  const float amax = _mm512_reduce_max_ps(top);
  const float sa = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
  const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(c1));
  const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
  scale = sa;
  sum = total;
  zterm = sa * static_cast<float>(total);
  if (rest) {  // v becomes the residual
    v0 = _mm512_sub_ps(v0, _mm512_mul_ps(_mm512_set1_ps(sa), _mm512_cvtepi32_ps(c0)));
    v1 = _mm512_sub_ps(v1, _mm512_mul_ps(_mm512_set1_ps(sa), _mm512_cvtepi32_ps(c1)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantise_row_avx512(const at::BFloat16* src, int64_t nb,
                                                                               int parts, int64_t k, int8_t* q,
                                                                               float* scale, float* zterm,
                                                                               int32_t* sum) {
  for (int64_t b = 0; b < nb; ++b) {
    const __m512i raw = _mm512_loadu_si512(src + b * kBlock);
    __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
    __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
    for (int p = 0; p < parts; ++p) {
      quantise_block_avx512(v0, v1, q + p * k + b * kBlock, scale[p * nb + b], zterm[p * nb + b], sum[p * nb + b],
                            p + 1 < parts);
    }
  }
}

// `rows` >= m rows are allocated, those past m zero (the AMX path computes whole groups of 16 rows).
Quantised quantise(const at::BFloat16* x, int64_t m, int64_t k, int64_t stride, int64_t rows, bool avx512,
                   int parts) {
  const int64_t nb = k / kBlock, vrows = rows * parts;
  Quantised out{std::vector<int8_t>(vrows * k), std::vector<float>(vrows * nb), std::vector<float>(vrows * nb),
                std::vector<int32_t>(vrows * nb)};
  souverain::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t v = r * parts;
      if (avx512) {
        quantise_row_avx512(x + r * stride, nb, parts, k, out.q.data() + v * k, out.scale.data() + v * nb,
                            out.zterm.data() + v * nb, out.sum.data() + v * nb);
        continue;
      }
      float vals[kBlock], rest[kBlock];
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t i = 0; i < kBlock; ++i) vals[i] = static_cast<float>(x[r * stride + b * kBlock + i]);
        for (int p = 0; p < parts; ++p) {
          const int64_t at = (v + p) * nb + b;
          quantise_block(p == 0 ? vals : rest, out.q.data() + (v + p) * k + b * kBlock, out.scale[at], out.zterm[at],
                         out.sum[at], p + 1 < parts ? (p == 0 ? rest : nullptr) : nullptr);
        }
      }
    }
  });
  return out;
}

struct Rows {  // R rows of a quantised x (P parts each: entry r * P + p), for one kernel call
  const int8_t* q[2 * kGroup];
  const float* scale[2 * kGroup];
  const float* zterm[2 * kGroup];
  const int32_t* sum[2 * kGroup];
  at::BFloat16* y[kGroup];  // 16 outputs each, rounded to bf16...
  float* yf[kGroup];        // ...or in fp32 where set (logits)
};

// fp32 to bf16, rounding to nearest even as PyTorch does (NaN stays NaN).
__attribute__((target("avx512f,avx512bw"))) inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

__attribute__((target("avx2,fma"))) inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
  // 8 x int32 (each < 65536) to 8 x uint16
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// A tile's 16 bf16 scales and 16 zeros of one block (p: [scales | zeros]), to fp32.
__attribute__((target("avx512f,avx512bw"))) inline void load_scales(const uint16_t* p, __m512& s, __m512& z) {
  s = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  z = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kRows))), 16));
}

// One tile of 16 output rows for R rows of x. Bits 4: per block 4 x 64 bytes of nibbles, then bf16
// [scales | zeros] of the tile's rows; y = sum_b s * sa * (sum q*a - 8 sum a) + z * sa * sum a. Bits 8:
// per block 8 x 64 bytes of codes w + 128 (weights symmetric per output row, scale `row_scale`);
// y = row_scale * sum_b sa * (sum (w + 128) * a - 128 sum a).
template <int Bits, int R, int P>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const uint8_t* w, const uint16_t* sz,
                                                                         const float* row_scale, int64_t nb,
                                                                         const Rows& x) {
  constexpr int kParts = Bits == 4 ? 4 : 8, kShift = Bits == 4 ? 3 : 7;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i c[8];  // the block's codes: lane j of c[t] holds row j's codes 4t .. 4t + 3
    const uint8_t* wb = w + b * kParts * 64;
    for (int t = 0; t < kParts; ++t) {
      const __m512i v = _mm512_loadu_si512(wb + t * 64);
      if constexpr (Bits == 4) {
        c[t] = _mm512_and_si512(v, low);
        c[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      } else {
        c[t] = v;
      }
    }
    __m512 s = _mm512_setzero_ps(), z = s;
    if constexpr (Bits == 4) load_scales(sz + b * 2 * kRows, s, z);
    for (int v = 0; v < R * P; ++v) {  // each row's parts in turn, into its accumulator
      const int r = v / P;
      const int32_t* a = reinterpret_cast<const int32_t*>(x.q[v] + b * kBlock);
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int t = 0; t < 8; t += 2) {
        s0 = _mm512_dpbusd_epi32(s0, c[t], _mm512_set1_epi32(a[t]));
        s1 = _mm512_dpbusd_epi32(s1, c[t + 1], _mm512_set1_epi32(a[t + 1]));
      }
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(x.sum[v][b] << kShift));
      if constexpr (Bits == 4) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, _mm512_set1_ps(x.scale[v][b])), acc[r]);
        acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(x.zterm[v][b]), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(x.scale[v][b]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (Bits == 8) acc[r] = _mm512_mul_ps(acc[r], _mm512_loadu_ps(row_scale));
    if (x.yf[r]) {
      _mm512_storeu_ps(x.yf[r], acc[r]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x.y[r]), to_bf16(acc[r]));
    }
  }
}

__attribute__((target("avx2,fma"))) inline __m256 bf16_to_f32(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Pairs of code x activation products summed in int16 (`vpmaddubsw`, unsigned x signed, saturating): 4-bit
// codes as they are (2 * 15 * 127 fits); 8-bit ones (w + 128) back to signed w, multiplied as |w| times a
// with w's sign (2 * 127 * 127 fits; 255 * 127 would not), so their sums need no offset.
template <int Bits>
__attribute__((target("avx2,fma"))) inline __m256i product(__m256i codes, __m256i a) {
  if constexpr (Bits == 4) {
    return _mm256_maddubs_epi16(codes, a);
  } else {
    const __m256i w = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
  }
}

// The same for AVX2: rows 8h .. 8h + 7 of the tile from bytes 32h .. 32h + 31 of each 64-byte part.
template <int Bits, int R, int P>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t* w, const uint16_t* sz, const float* row_scale,
                                                   int64_t nb, const Rows& x) {
  constexpr int kParts = Bits == 4 ? 4 : 8, kShift = 3;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * kParts * 64;
    for (int h = 0; h < 2; ++h) {
      __m256i c[8];
      for (int t = 0; t < kParts; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + t * 64 + h * 32));
        if constexpr (Bits == 4) {
          c[t] = _mm256_and_si256(v, low);
          c[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        } else {
          c[t] = v;
        }
      }
      __m256 s = _mm256_setzero_ps(), z = s;
      if constexpr (Bits == 4) {
        const uint16_t* p = sz + b * 2 * kRows;
        s = bf16_to_f32(p + h * 8);
        z = bf16_to_f32(p + kRows + h * 8);
      }
      for (int v = 0; v < R * P; ++v) {
        const int r = v / P;
        const int32_t* a = reinterpret_cast<const int32_t*>(x.q[v] + b * kBlock);
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int t = 0; t < 8; t += 2) {
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(product<Bits>(c[t], _mm256_set1_epi32(a[t])), ones));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(product<Bits>(c[t + 1], _mm256_set1_epi32(a[t + 1])), ones));
        }
        // 8-bit codes were multiplied as signed values: no offset to take back.
        const __m256i sum = Bits == 4 ? _mm256_sub_epi32(_mm256_add_epi32(s0, s1),
                                                          _mm256_set1_epi32(x.sum[v][b] << kShift))
                                      : _mm256_add_epi32(s0, s1);
        if constexpr (Bits == 4) {
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(s, _mm256_set1_ps(x.scale[v][b])),
                                      acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(x.zterm[v][b]), acc[r][h]);
        } else {
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(x.scale[v][b]), acc[r][h]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m256 v = acc[r][h];
      if constexpr (Bits == 8) v = _mm256_mul_ps(v, _mm256_loadu_ps(row_scale + h * 8));
      if (x.yf[r]) {
        _mm256_storeu_ps(x.yf[r] + h * 8, v);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(x.y[r] + h * 8), to_bf16(v));
      }
    }
  }
}

using TileFn = void (*)(const uint8_t*, const uint16_t*, const float*, int64_t, const Rows&);

template <int Bits>
TileFn pick(bool avx512, int rows, int parts) {
  static const TileFn wide[2][4] = {
      {tile_avx512<Bits, 1, 1>, tile_avx512<Bits, 2, 1>, tile_avx512<Bits, 3, 1>, tile_avx512<Bits, 4, 1>},
      {tile_avx512<Bits, 1, 2>, tile_avx512<Bits, 2, 2>, tile_avx512<Bits, 3, 2>, tile_avx512<Bits, 4, 2>}};
  static const TileFn narrow[2][4] = {
      {tile_avx2<Bits, 1, 1>, tile_avx2<Bits, 2, 1>, tile_avx2<Bits, 3, 1>, tile_avx2<Bits, 4, 1>},
      {tile_avx2<Bits, 1, 2>, tile_avx2<Bits, 2, 2>, tile_avx2<Bits, 3, 2>, tile_avx2<Bits, 4, 2>}};
  return (avx512 ? wide : narrow)[parts - 1][rows - 1];
}

#if defined(SOUVERAIN_AMX) && defined(__AMX_INT8__)
#define SOUVERAIN_AMX_INT8 1

// Tiles 0, 1 (and 6, 7 for x's second parts): int32 sums (16 rows of x x 16 output rows) of two blocks
// in flight; 2, 3: x's codes (16 rows x one block of 32); 4, 5: the weight's block, 8 rows of 16 output
// rows x 4 codes -- pack_q4's layout with the nibbles unpacked (pack_q8's parts as they are).
inline void configure_int8() {
  souverain::amx::TileConfig cfg;
  for (int t = 0; t < 2; ++t) {
    cfg.rows[t] = cfg.rows[6 + t] = 16;
    cfg.colsb[t] = cfg.colsb[6 + t] = 64;
    cfg.rows[2 + t] = 16;
    cfg.colsb[2 + t] = 32;
    cfg.rows[4 + t] = 8;
    cfg.colsb[4 + t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One block's int32 sums for 16 rows of x (P parts: every P-th row of x's codes from xb, rows ldx bytes
// apart, part 2 from xb + k) into[p]: tiles C (C2 for part 2), A for x, B for the weight's block wb.
// (A macro: the tile intrinsics take their tile numbers as literals.) int4 codes are unpacked as signed
// q - 8 (`tdpbssd`: the sum is sum (q - 8) * a, no offset to take back per row); int8 codes stay w + 128
// (`tdpbsud`, and 128 * sum a taken back as in tile_avx512). The same integers either way.
#define SOUVERAIN_DP(C, A, B)     \
  do {                            \
    if constexpr (Bits == 4) {    \
      _tile_dpbssd(C, A, B);      \
    } else {                      \
      _tile_dpbsud(C, A, B);      \
    }                             \
  } while (0)
#define SOUVERAIN_BLOCK_SUMS(C, C2, A, B, wb, xb, into) \
  do {                                                  \
    _tile_loadd(B, wb, 64);                             \
    _tile_loadd(A, xb, ldx);                            \
    _tile_zero(C);                                      \
    SOUVERAIN_DP(C, A, B);                              \
    _tile_stored(C, (into)[0], 64);                     \
    if constexpr (P == 2) {                             \
      _tile_loadd(A, (xb) + k, ldx);                    \
      _tile_zero(C2);                                   \
      SOUVERAIN_DP(C2, A, B);                           \
      _tile_stored(C2, (into)[1], 64);                  \
    }                                                   \
  } while (0)

// Output tiles [t0, t1) for every row of x on AMX: per block of 32 values, `tdpbssd`/`tdpbsud` (see
// SOUVERAIN_DP) give the exact int32 sums `vpdpbusd` gives in tile_avx512, and they are scaled and summed
// in fp32 by the same instructions in the same order: each row's bits are tile_avx512's, so AMX's wide
// steps and VNNI's narrow ones are one model (batch invariance). The tiles do the multiply-adds; the fp32
// steps per block (4 vector instructions per 16 outputs and part, 5 for int8) are the cost (1000 x 960 x
// 576: 1.21 ms, against 0.34 for the bf16 tiles of gemm.cpp's amx_linear_int4 and 2.03 for VNNI), so
// a group of 16 rows keeps its accumulators in registers over all blocks, while the tiles compute the
// next block's sums. P: parts per row of x (see Quantised).
template <int Bits, int P>
void tiles_amx(const Quantised& xq, int64_t m, int64_t mpad, int64_t k, const uint8_t* w, const uint16_t* sz,
               const float* row_scale, int64_t t0, int64_t t1, int64_t nb, at::BFloat16* out, float* out32,
               int64_t n) {
  constexpr int kParts = Bits == 4 ? 4 : 8, kShift = Bits == 4 ? 3 : 7;
  const int64_t tile_bytes = nb * kParts * 64;
  thread_local std::vector<uint8_t> space;
  if (static_cast<int64_t>(space.size()) < nb * 512 + 64) space.resize(nb * 512 + 64);
  auto* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(space.data()) + 63) & ~uintptr_t(63));
  alignas(64) int32_t sums[3][P][16 * 16];
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  configure_int8();
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * tile_bytes;
    const uint8_t* blocks = wt;  // the weight's blocks, 512 bytes each
    if constexpr (Bits == 4) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int part = 0; part < 4; ++part) {
          const __m512i v = _mm512_loadu_si512(wt + (b * 4 + part) * 64);
          _mm512_store_si512(panel + b * 512 + part * 64, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
          _mm512_store_si512(panel + b * 512 + (part + 4) * 64,
                             _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
        }
      }
      blocks = panel;
    }
    const uint16_t* tsz = sz ? sz + t * nb * 2 * kRows : nullptr;
    for (int64_t r0 = 0; r0 < mpad; r0 += 16) {
      // Part p of rows r0 .. r0 + 15: every P-th row of the codes from row r0 * P + p.
      const int8_t* xr = xq.q.data() + r0 * P * k;
      const int64_t ldx = P * k;
      // Block b's sums into tile b % 2 (6 + b % 2 for second parts), then into sums[b % 3]: the tiles work
      // two blocks ahead of the vector units.
      auto issue = [&](int64_t b) {
        const uint8_t* wb = blocks + b * 512;
        const int8_t* xb = xr + b * kBlock;
        if (b % 2 == 0) {
          SOUVERAIN_BLOCK_SUMS(0, 6, 2, 4, wb, xb, sums[b % 3]);
        } else {
          SOUVERAIN_BLOCK_SUMS(1, 7, 3, 5, wb, xb, sums[b % 3]);
        }
      };
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      issue(0);
      if (nb > 1) issue(1);
      for (int64_t b = 0; b < nb; ++b) {
        if (b + 2 < nb) issue(b + 2);
        __m512 s = _mm512_setzero_ps(), z = s;
        if constexpr (Bits == 4) load_scales(tsz + b * 2 * kRows, s, z);
        for (int r = 0; r < 16; ++r) {
          for (int p = 0; p < P; ++p) {
            const int64_t row = ((r0 + r) * P + p) * nb + b;
            const __m512i raw = _mm512_load_si512(sums[b % 3][p] + r * 16);
            const __m512i sum = Bits == 4 ? raw : _mm512_sub_epi32(raw, _mm512_set1_epi32(xq.sum[row] << kShift));
            if constexpr (Bits == 4) {
              acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, _mm512_set1_ps(xq.scale[row])), acc[r]);
              acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(xq.zterm[row]), acc[r]);
            } else {
              acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xq.scale[row]), acc[r]);
            }
          }
        }
      }
      for (int r = 0; r < 16 && r0 + r < m; ++r) {
        __m512 a = acc[r];
        if constexpr (Bits == 8) a = _mm512_mul_ps(a, _mm512_loadu_ps(row_scale + t * kRows));
        if (out32) {
          _mm512_storeu_ps(out32 + (r0 + r) * n + t * kRows, a);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r0 + r) * n + t * kRows), to_bf16(a));
        }
      }
    }
  }
}
#endif

}  // namespace

bool q4_supported(int64_t isa) {
  __builtin_cpu_init();
#ifdef SOUVERAIN_AMX_INT8
  if (isa == kIsaAmx) return amx_available() && q4_supported(512);
#else
  if (isa == kIsaAmx) return false;
#endif
  if (isa == 512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  if (isa == 256) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return false;
}

namespace {

// y [M, N] bf16 = x times the packed weight: tiles of 16 output rows; threads split the tiles only, so
// each output is computed whole by one thread, the same way whatever M is.
template <int Bits>
torch::Tensor linear(const torch::Tensor& x, const uint8_t* w, const uint16_t* sz, const float* row_scale,
                     int64_t tiles, int64_t nb, int64_t isa, int parts, bool fp32) {
  const int64_t m = x.size(0), k = x.size(1), n = tiles * kRows, tile_bytes = nb * (Bits == 4 ? 4 : 8) * 64;
  auto y = torch::empty({m, n}, x.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  if (m == 0) return y;
  const bool tiles_path = isa == kIsaAmx && m > kGroup;
  const int64_t mpad = tiles_path ? (m + 15) / 16 * 16 : m;
  const Quantised xq = quantise(x.data_ptr<at::BFloat16>(), m, k, x.stride(0), mpad, isa != 256, parts);
  at::BFloat16* out = fp32 ? nullptr : y.data_ptr<at::BFloat16>();
  float* out32 = fp32 ? y.data_ptr<float>() : nullptr;
#ifdef SOUVERAIN_AMX_INT8
  if (tiles_path) {
    souverain::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      if (parts == 2) {
        tiles_amx<Bits, 2>(xq, m, mpad, k, w, sz, row_scale, t0, t1, nb, out, out32, n);
      } else {
        tiles_amx<Bits, 1>(xq, m, mpad, k, w, sz, row_scale, t0, t1, nb, out, out32, n);
      }
      _tile_release();
    });
    return y;
  }
#endif
  const bool wide = isa != 256;
  souverain::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {  // a block of x's rows stays in L2 while the tiles pass
      const int64_t r1 = std::min(m, r0 + kRowBlock);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t r = r0; r < r1; r += kGroup) {
          const int rows = static_cast<int>(std::min<int64_t>(kGroup, r1 - r));
          Rows x_rows{};
          for (int i = 0; i < rows; ++i) {
            for (int p = 0; p < parts; ++p) {
              const int64_t v = (r + i) * parts + p;
              x_rows.q[i * parts + p] = xq.q.data() + v * k;
              x_rows.scale[i * parts + p] = xq.scale.data() + v * nb;
              x_rows.zterm[i * parts + p] = xq.zterm.data() + v * nb;
              x_rows.sum[i * parts + p] = xq.sum.data() + v * nb;
            }
            x_rows.y[i] = fp32 ? nullptr : out + (r + i) * n + t * kRows;
            x_rows.yf[i] = fp32 ? out32 + (r + i) * n + t * kRows : nullptr;
          }
          pick<Bits>(wide, rows, parts)(w + t * tile_bytes, sz ? sz + t * nb * 2 * kRows : nullptr,
                                 row_scale ? row_scale + t * kRows : nullptr, nb, x_rows);
        }
      }
    }
  });
  return y;
}

void check(const torch::Tensor& x, const torch::Tensor& codes, int64_t parts, int64_t isa, const char* name) {
  TORCH_CHECK(isa == 512 || isa == 256 || isa == kIsaAmx, name,
              ": isa must be 512 (AVX-512 VNNI), 256 (AVX2) or 1024 (AMX tiles, VNNI up to 4 rows)");
  TORCH_CHECK(q4_supported(isa), name, ": this CPU lacks the instructions of isa ", isa);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              name, ": x must be a CPU bfloat16 [M, K] with contiguous rows");
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(2) == parts && codes.size(3) == 64,
              name, ": codes must be uint8 [N/16, K/32, ", parts, ", 64] (tiles.py packs them)");
  TORCH_CHECK(x.size(1) == codes.size(1) * kBlock, name, ": x has ", x.size(1), " columns, the weight ",
              codes.size(1) * kBlock);
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, int64_t isa, bool fine, bool fp32) {
  check(x, codes, 4, isa, "q4_linear");
  const int64_t tiles = codes.size(0), nb = codes.size(1);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == tiles * nb * 2 * kRows,
              "q4_linear: scales must be bfloat16 [N/16, K/32, 2, 16] (pack_q4)");
  return linear<4>(x, codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>()),
                   nullptr, tiles, nb, isa, fine ? 2 : 1, fp32);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t isa, bool fp32) {
  check(x, codes, 8, isa, "q8_linear");
  const int64_t tiles = codes.size(0), nb = codes.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == tiles * kRows,
              "q8_linear: scales must be float32 [N] (pack_q8)");
  return linear<8>(x, codes.data_ptr<uint8_t>(), nullptr, scales.data_ptr<float>(), tiles, nb, isa, 1, fp32);
}

}  // namespace souverain
