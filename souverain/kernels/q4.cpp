// int4 (and int8) weights times int8-quantised activations: AVX-512 VNNI, AVX2, and AMX tiles.
//
// x is read to 11 bits in two int8 parts, per block of 32 values: q1 = round(x * 127 / amax) and
// q2 = round((x - q1 * amax / 127) * 16 * 127 / amax) (|q2| <= 8), so x = u * (16 q1 + q2) with one unit
// u = amax / 127 / 16 per block. The weight's int4 codes q have a scale s and a zero z per 32 values
// (w = (q - 8) * s + z, llama.cpp's Q4_1 read signed), so per block b the exact integers
//   J[b] = sum (16 q1 + q2) * (q - 8)    and    X[b] = sum (16 q1 + q2)
// are made by the CPU's integer dot products, and scaled in fp32, in block order:
//   acc = fma(J[b], s[b] * u[b], acc); acc = fma(z[b], u[b] * X[b], acc);   y = acc.
// The integer sums are exact on every instruction set and the fp32 steps run in the same order for every
// row, whatever the number of rows in the call or their neighbours: a row's result is the same alone or in
// a batch, and the same on AMX, AVX-512 and AVX2. Accuracy (SmolLM2 in bf16, mean KL to its fp32 model over
// six chat prompts, PyTorch emulation): 0.0028 with these activations, 0.0027 with bf16 ones, 0.0040 with the
// int8 ones they replaced (8 bits per block, 15 in two parts for wqkv and w2 only), 0.0101 with the same
// 11 bits per row instead of per block. On AMX the two parts side by side make J in one tile product.
//
// Layout (`pack_q4` in tiles.py): tiles of 16 output rows. Per tile and K-block: 4 x 64 bytes of
// codes, byte 4j + i of part t holds row j's codes k = 4t + i (low nibble) and 16 + 4t + i (high
// nibble), so one 64-byte load gives, after a mask or a shift, the 4 consecutive codes of each of 16
// rows that `vpdpbusd` (AVX-512 VNNI) multiplies with 4 broadcast activation bytes into 16 int32
// lanes (the sums of q * q1 and of q * q2, combined as 16 * the first + the second); then [2, 16] bf16
// scales and zeros.
// AVX2 has no VNNI: `vpmaddubsw` + `vpmaddwd` make the sums of q * q1 and q * q2 (no saturation:
// 2 * 15 * 127 < 32767), 8 rows per register, combined as 16 * the first + the second.
//
// `q8_linear` is the same for int8 weights with one scale per output row (the output projection, whose
// logits want more than 4 bits): codes w + 128 in 8 parts of 64 bytes per tile and block, no unpacking.
// It reads x per row (one u for the row: the logits lose nothing measurable), so the sums I1 = sum q1 * w
// and I2 = sum q2 * w run over all of K in int32 (on AMX in the tiles, no step per block) and
// y = ((16 I1 + I2) * u) * scale. The output is rounded to bf16 here (to nearest even), or left in fp32.
//
// isa 1024 (the `amx` backend): more than 4 rows go through AMX tiles (`tiles_amx`: `tdpbssd` on x's two
// parts side by side, 64 bytes per block, against the codes unpacked as 16 (q - 8) and q - 8, gives J in one
// product), fewer through AVX-512 VNNI: one model for every row count.

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
constexpr int64_t kMaxK = 65536;    // q8's sums of q1 * (w + 128) over all of K stay within int32

// x's rows, quantised (see the top): per row, per block of 32, 32 bytes of q1 then 32 of q2 (2K bytes a
// row); per row and block the unit u, X as an integer and u * X (the zero term's factor); per row the sums
// of q1 and of q2 over the row (q8's offsets). int4 weights read x per block (u per block), int8 ones per
// row (one u for all blocks: the tiles sum over all of K).
struct Quantised {
  std::vector<int8_t> q;
  std::vector<float> unit, zterm;
  std::vector<int32_t> sum, total;
};

struct RowOut {  // where one row's quantised values go
  int8_t* q;     // block b's 64 bytes at q + b * step
  int64_t step;
  float* unit;
  float* zterm;
  int32_t* sum;
  int32_t* total;
};

// Values [i0, i1) of x: q1 and q2 with scale amax / 127 into o (q, sums and totals).
inline void quantise_span(const at::BFloat16* x, int64_t i0, int64_t i1, float amax, const RowOut& o) {
  const float sa = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f, inv16 = inv * 16.f;
  for (int64_t b = i0 / kBlock; b < i1 / kBlock; ++b) {
    int32_t s1 = 0, s2 = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      const float v = static_cast<float>(x[b * kBlock + i]);
      const int32_t c1 = static_cast<int32_t>(std::nearbyint(v * inv));
      const float rest = v - sa * static_cast<float>(c1);
      const int32_t c2 = static_cast<int32_t>(std::nearbyint(rest * inv16));
      o.q[b * o.step + i] = static_cast<int8_t>(c1);
      o.q[b * o.step + 32 + i] = static_cast<int8_t>(c2);
      s1 += c1;
      s2 += c2;
    }
    o.sum[b] = 16 * s1 + s2;
    o.unit[b] = sa / 16.f;
    o.zterm[b] = o.unit[b] * static_cast<float>(o.sum[b]);
    o.total[0] += s1;
    o.total[1] += s2;
  }
}

// The scalar form, for CPUs without AVX-512; the same IEEE operations as the vector one (the build has
// -ffp-contract=off: no fused multiply-adds).
void quantise_row(const at::BFloat16* x, int64_t k, bool per_row, const RowOut& o) {
  const int64_t span = per_row ? k : kBlock;
  for (int64_t i0 = 0; i0 < k; i0 += span) {
    float amax = 0.f;
    for (int64_t i = i0; i < i0 + span; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
    quantise_span(x, i0, i0 + span, amax, o);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The same, 16 values at a time: the same bits (the maximum is exact and skips a NaN as std::max does, the
// products and the residual are the same IEEE operations, cvtps rounds to nearest even as nearbyint does).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantise_row_avx512(const at::BFloat16* x, int64_t k,
                                                                               bool per_row, const RowOut& o) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const int64_t span = per_row ? k : kBlock;
  for (int64_t i0 = 0; i0 < k; i0 += span) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = i0; i < i0 + span; i += 16) top = _mm512_max_ps(_mm512_and_ps(load_bf16(x + i), sign), top);
    const float amax = _mm512_reduce_max_ps(top);
    const float sa = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f, inv16 = inv * 16.f;
    const __m512 vsa = _mm512_set1_ps(sa), vinv = _mm512_set1_ps(inv), vinv16 = _mm512_set1_ps(inv16);
    for (int64_t b = i0 / kBlock; b < (i0 + span) / kBlock; ++b) {
      __m512i s1 = _mm512_setzero_si512(), s2 = s1;
      for (int h = 0; h < 2; ++h) {
        const __m512 v = load_bf16(x + b * kBlock + h * 16);
        const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));
        const __m512 rest = _mm512_sub_ps(v, _mm512_mul_ps(vsa, _mm512_cvtepi32_ps(c1)));
        const __m512i c2 = _mm512_cvtps_epi32(_mm512_mul_ps(rest, vinv16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q + b * o.step + h * 16), _mm512_cvtepi32_epi8(c1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q + b * o.step + 32 + h * 16), _mm512_cvtepi32_epi8(c2));
        s1 = _mm512_add_epi32(s1, c1);
        s2 = _mm512_add_epi32(s2, c2);
      }
      if (per_row) {  // q8 takes the parts' sums back separately
        const int32_t a = _mm512_reduce_add_epi32(s1), c = _mm512_reduce_add_epi32(s2);
        o.sum[b] = 16 * a + c;
        o.total[0] += a;
        o.total[1] += c;
      } else {
        o.sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(s1, 4), s2));
      }
      o.unit[b] = sa / 16.f;
      o.zterm[b] = o.unit[b] * static_cast<float>(o.sum[b]);
    }
  }
}

// `rows` >= m rows are allocated (the AMX path computes whole groups of 16 rows; those past m are left as
// they are: their tile rows are computed and dropped). `tiled` (AMX): the codes of each group of 16 rows
// block by block, [rows / 16, K / 32, 16, 64], so a tile of x is 1 KB in one piece; else row by row,
// [rows, K / 32, 64]. The buffers are the calling thread's, kept from call to call: a fresh allocation of
// megabytes is fresh pages from the OS each time.
const Quantised& quantise(const at::BFloat16* x, int64_t m, int64_t k, int64_t stride, int64_t rows, bool avx512,
                          bool per_row, bool tiled) {
  const int64_t nb = k / kBlock;
  thread_local Quantised mine;
  Quantised& out = mine;  // (the workers below must write the calling thread's, not their own)
  auto grow = [](auto& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  };
  grow(out.q, rows * 2 * k);
  grow(out.unit, rows * nb);
  grow(out.zterm, rows * nb);
  grow(out.sum, rows * nb);
  grow(out.total, rows * 2);
  souverain::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowOut o{tiled ? out.q.data() + (r / 16) * 32 * k + (r % 16) * 64 : out.q.data() + r * 2 * k,
                     tiled ? 1024 : 64, out.unit.data() + r * nb, out.zterm.data() + r * nb,
                     out.sum.data() + r * nb, out.total.data() + r * 2};
      o.total[0] = o.total[1] = 0;
      if (avx512) {
        quantise_row_avx512(x + r * stride, k, per_row, o);
      } else {
        quantise_row(x + r * stride, k, per_row, o);
      }
    }
  });
  return out;
}

struct Rows {  // R rows of a quantised x, for one kernel call
  const int8_t* q[kGroup];
  const float* unit[kGroup];
  const float* zterm[kGroup];
  const int32_t* sum[kGroup];
  const int32_t* total[kGroup];
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

__attribute__((target("avx512f,avx512bw"))) inline void store(__m512 v, at::BFloat16* y, float* yf) {
  if (yf) {
    _mm512_storeu_ps(yf, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), to_bf16(v));
  }
}

// A tile's 16 bf16 scales and 16 zeros of one block (p: [scales | zeros]), to fp32.
__attribute__((target("avx512f,avx512bw"))) inline void load_scales(const uint16_t* p, __m512& s, __m512& z) {
  s = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  z = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kRows))), 16));
}

// The int8 output: ((16 I1 + I2) * u) * scale, from the two parts' exact sums.
__attribute__((target("avx512f,avx512bw"))) inline __m512 q8_output(__m512i i1, __m512i i2, float unit,
                                                                   const float* row_scale) {
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i1), _mm512_set1_ps(16.f)), _mm512_cvtepi32_ps(i2));
  return _mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(unit)), _mm512_loadu_ps(row_scale));
}

// One tile of 16 output rows for R rows of x (see the top). Bits 4: per block 4 x 64 bytes of nibbles,
// then bf16 [scales | zeros] of the tile's rows. Bits 8: per block 8 x 64 bytes of codes w + 128
// (weights symmetric per output row, scale `row_scale`), sums over all blocks.
template <int Bits, int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const uint8_t* w, const uint16_t* sz,
                                                                         const float* row_scale, int64_t nb,
                                                                         const Rows& x) {
  if constexpr (Bits == 4) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
      __m512i c[8];  // lane j of c[t] holds row j's codes 4t .. 4t + 3 (t < 4) or 16 + 4(t - 4) .. (t >= 4)
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(w + (b * 4 + t) * 64);
        c[t] = _mm512_and_si512(v, low);
        c[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      __m512 s, z;
      load_scales(sz + b * 2 * kRows, s, z);
      for (int r = 0; r < R; ++r) {
        const int32_t* a1 = reinterpret_cast<const int32_t*>(x.q[r] + b * 64);
        const int32_t* a2 = a1 + 8;
        __m512i p1 = _mm512_setzero_si512(), p2 = p1, p3 = p1, p4 = p1;  // sum q * q1, sum q * q2
        for (int t = 0; t < 8; t += 2) {
          p1 = _mm512_dpbusd_epi32(p1, c[t], _mm512_set1_epi32(a1[t]));
          p2 = _mm512_dpbusd_epi32(p2, c[t + 1], _mm512_set1_epi32(a1[t + 1]));
          p3 = _mm512_dpbusd_epi32(p3, c[t], _mm512_set1_epi32(a2[t]));
          p4 = _mm512_dpbusd_epi32(p4, c[t + 1], _mm512_set1_epi32(a2[t + 1]));
        }
        // J = 16 sum q * q1 + sum q * q2 - 8 X: the sum of (16 q1 + q2)(q - 8)
        const __m512i j = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(p1, p2), 4), _mm512_add_epi32(p3, p4)),
            _mm512_set1_epi32(x.sum[r][b] * 8));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(j), _mm512_mul_ps(s, _mm512_set1_ps(x.unit[r][b])), acc[r]);
        acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(x.zterm[r][b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) store(acc[r], x.y[r], x.yf[r]);
  } else {
    __m512i i1[R], i2[R];
    for (int r = 0; r < R; ++r) i1[r] = i2[r] = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; ++b) {
      __m512i c[8];
      for (int t = 0; t < 8; ++t) c[t] = _mm512_loadu_si512(w + (b * 8 + t) * 64);
      for (int r = 0; r < R; ++r) {
        const int32_t* a1 = reinterpret_cast<const int32_t*>(x.q[r] + b * 64);
        const int32_t* a2 = a1 + 8;
        for (int t = 0; t < 8; ++t) {
          i1[r] = _mm512_dpbusd_epi32(i1[r], c[t], _mm512_set1_epi32(a1[t]));
          i2[r] = _mm512_dpbusd_epi32(i2[r], c[t], _mm512_set1_epi32(a2[t]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {  // the codes were w + 128: take 128 times the parts' sums back
      const __m512i w1 = _mm512_sub_epi32(i1[r], _mm512_set1_epi32(x.total[r][0] * 128));
      const __m512i w2 = _mm512_sub_epi32(i2[r], _mm512_set1_epi32(x.total[r][1] * 128));
      store(q8_output(w1, w2, x.unit[r][0], row_scale), x.y[r], x.yf[r]);
    }
  }
}

__attribute__((target("avx2,fma"))) inline __m256 bf16_to_f32(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Pairs of code x activation products summed in int16 (`vpmaddubsw`, unsigned x signed, saturating): 4-bit
// codes as they are (2 * 15 * 127 fits); 8-bit ones (w + 128) back to signed w, multiplied as |w| times a
// with w's sign (2 * 127 * 127 fits; 255 * 127 would not), so their sums need no offset. Then pairs of
// those to int32.
template <int Bits>
__attribute__((target("avx2,fma"))) inline __m256i product(__m256i codes, __m256i a) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits == 4) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, a), ones);
  } else {
    const __m256i w = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), ones);
  }
}

// The same for AVX2: rows 8h .. 8h + 7 of the tile from bytes 32h .. 32h + 31 of each 64-byte part.
template <int Bits, int R>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t* w, const uint16_t* sz, const float* row_scale,
                                                   int64_t nb, const Rows& x) {
  constexpr int kParts = Bits == 4 ? 4 : 8;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[R][2];       // Bits 4
  __m256i i1[R][2], i2[R][2];  // Bits 8: the parts' sums over all blocks
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      acc[r][h] = _mm256_setzero_ps();
      i1[r][h] = i2[r][h] = _mm256_setzero_si256();
    }
  }
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
      for (int r = 0; r < R; ++r) {
        const int32_t* a1 = reinterpret_cast<const int32_t*>(x.q[r] + b * 64);
        const int32_t* a2 = a1 + 8;
        __m256i p1 = _mm256_setzero_si256(), p2 = p1;
        for (int t = 0; t < 8; ++t) {
          p1 = _mm256_add_epi32(p1, product<Bits>(c[t], _mm256_set1_epi32(a1[t])));
          p2 = _mm256_add_epi32(p2, product<Bits>(c[t], _mm256_set1_epi32(a2[t])));
        }
        if constexpr (Bits == 4) {  // J = 16 sum q * q1 + sum q * q2 - 8 X: the sum of (16 q1 + q2)(q - 8)
          const __m256i j = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(p1, 4), p2),
                                             _mm256_set1_epi32(x.sum[r][b] * 8));
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(j), _mm256_mul_ps(s, _mm256_set1_ps(x.unit[r][b])),
                                      acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(z, _mm256_set1_ps(x.zterm[r][b]), acc[r][h]);
        } else {
          i1[r][h] = _mm256_add_epi32(i1[r][h], p1);
          i2[r][h] = _mm256_add_epi32(i2[r][h], p2);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m256 v;
      if constexpr (Bits == 4) {
        v = acc[r][h];
      } else {
        const __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i1[r][h]), _mm256_set1_ps(16.f)),
                                       _mm256_cvtepi32_ps(i2[r][h]));
        v = _mm256_mul_ps(_mm256_mul_ps(t, _mm256_set1_ps(x.unit[r][0])), _mm256_loadu_ps(row_scale + h * 8));
      }
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
TileFn pick(bool avx512, int rows) {
  static const TileFn wide[4] = {tile_avx512<Bits, 1>, tile_avx512<Bits, 2>, tile_avx512<Bits, 3>,
                                 tile_avx512<Bits, 4>};
  static const TileFn narrow[4] = {tile_avx2<Bits, 1>, tile_avx2<Bits, 2>, tile_avx2<Bits, 3>, tile_avx2<Bits, 4>};
  return (avx512 ? wide : narrow)[rows - 1];
}

#if defined(SOUVERAIN_AMX) && defined(__AMX_INT8__)
#define SOUVERAIN_AMX_INT8 1

// int4: tiles 0, 1: J (16 rows of x x 16 output rows) of two blocks in flight; 2, 3: x's two parts of a
// block (16 rows x 64 bytes); 4, 5: the weight's block unpacked, 16 (q - 8) for q1's 32 values then q - 8
// for q2's (16 rows of 16 output rows x 4 codes). int8: tiles 0, 1: I1, I2 over all of K; 2, 3: q1 and q2
// of a block (16 rows x 32 bytes); 4: the block's codes w + 128 (8 rows, pack_q8's layout as it is).
inline void configure_int8(int bits) {
  souverain::amx::TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  if (bits == 8) {
    cfg.colsb[2] = cfg.colsb[3] = 32;
    cfg.rows[4] = 8;
    cfg.rows[5] = cfg.colsb[5] = 0;
  }
  _tile_loadconfig(&cfg);
}

// Output tiles [t0, t1) for every row of x on AMX (see the top): J per block by one `tdpbssd`, scaled in
// fp32 by the instructions tile_avx512 runs, in its order, so each row's bits are tile_avx512's. The fp32
// steps per block (a load, a conversion and two fused multiply-adds per 16 outputs) are the cost, so a
// group of 16 rows keeps its accumulators in registers over all blocks while the tiles compute the sums
// two blocks ahead. int8 weights need no steps per block: the tiles sum over all of K.
template <int Bits>
void tiles_amx(const Quantised& xq, int64_t m, int64_t mpad, int64_t k, const uint8_t* w, const uint16_t* sz,
               const float* row_scale, int64_t t0, int64_t t1, int64_t nb, at::BFloat16* out, float* out32,
               int64_t n) {
  const int64_t ldx = 2 * k;  // bytes of x's codes per row (a group of 16 rows: 16 ldx, block by block)
  configure_int8(Bits);
  if constexpr (Bits == 8) {
    alignas(64) int32_t sums[2][16 * 16];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = w + t * nb * 512;
      for (int64_t r0 = 0; r0 < mpad; r0 += 16) {
        const int8_t* xr = xq.q.data() + r0 * ldx;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t b = 0; b < nb; ++b) {
          _tile_loadd(4, wt + b * 512, 64);
          _tile_loadd(2, xr + b * 1024, 64);
          _tile_loadd(3, xr + b * 1024 + 32, 64);
          _tile_dpbsud(0, 2, 4);
          _tile_dpbsud(1, 3, 4);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        for (int r = 0; r < 16 && r0 + r < m; ++r) {
          const int32_t* tot = xq.total.data() + (r0 + r) * 2;
          const __m512i i1 = _mm512_sub_epi32(_mm512_load_si512(sums[0] + r * 16), _mm512_set1_epi32(tot[0] * 128));
          const __m512i i2 = _mm512_sub_epi32(_mm512_load_si512(sums[1] + r * 16), _mm512_set1_epi32(tot[1] * 128));
          const int64_t at = (r0 + r) * n + t * kRows;
          store(q8_output(i1, i2, xq.unit[(r0 + r) * nb], row_scale + t * kRows), out ? out + at : nullptr,
                out32 ? out32 + at : nullptr);
        }
      }
    }
  } else {
    thread_local std::vector<uint8_t> space;
    if (static_cast<int64_t>(space.size()) < nb * 1024 + 64) space.resize(nb * 1024 + 64);
    auto* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(space.data()) + 63) & ~uintptr_t(63));
    alignas(64) int32_t sums[3][16 * 16];
    const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
    const __m512i eight = _mm512_set1_epi8(8), flip = _mm512_set1_epi8(static_cast<char>(0x80));
    // Rows in chunks whose codes stay in L2 (~512 KB) while every tile of the thread passes over them: the
    // codes of 1,000 rows of K = 1536 (3 MB) came from L3 once per tile, and the tiles waited on them.
    const int64_t chunk = std::max<int64_t>(16, (512 * 1024 / ldx) / 16 * 16);
    for (int64_t c0 = 0; c0 < mpad; c0 += chunk) {
    const int64_t c1 = std::min(mpad, c0 + chunk);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = w + t * nb * 256;
      // Block b's B tile: rows 0-7 16 (q - 8) = 16 q ^ 0x80 as int8, rows 8-15 q - 8 (row p < 4 of each half
      // from part p's low nibbles, p >= 4 from part p - 4's high ones, as the parts hold them).
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* pb = panel + b * 1024;
        for (int part = 0; part < 4; ++part) {
          const __m512i v = _mm512_loadu_si512(wt + (b * 4 + part) * 64);
          _mm512_store_si512(pb + part * 64, _mm512_xor_si512(_mm512_and_si512(_mm512_slli_epi16(v, 4), high), flip));
          _mm512_store_si512(pb + (part + 4) * 64, _mm512_xor_si512(_mm512_and_si512(v, high), flip));
          _mm512_store_si512(pb + (part + 8) * 64, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
          _mm512_store_si512(pb + (part + 12) * 64,
                             _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
        }
      }
      const uint16_t* tsz = sz + t * nb * 2 * kRows;
      for (int64_t r0 = c0; r0 < c1; r0 += 16) {
        const int8_t* xr = xq.q.data() + r0 * ldx;
        // Block b's J into tile b % 2 (`compute`), then into sums[b % 3] (`drain`). The vector steps of block b
        // come between block b + 2's product and its store: loads placed after a tile store wait for it (as
        // if they might read what it writes), which had the vectors and the tiles take turns.
        auto compute = [&](int64_t b) {
          if (b % 2 == 0) {
            _tile_loadd(4, panel + b * 1024, 64);
            _tile_loadd(2, xr + b * 1024, 64);
            _tile_zero(0);
            _tile_dpbssd(0, 2, 4);
          } else {
            _tile_loadd(5, panel + b * 1024, 64);
            _tile_loadd(3, xr + b * 1024, 64);
            _tile_zero(1);
            _tile_dpbssd(1, 3, 5);
          }
        };
        auto drain = [&](int64_t b) {
          if (b % 2 == 0) {
            _tile_stored(0, sums[b % 3], 64);
          } else {
            _tile_stored(1, sums[b % 3], 64);
          }
        };
        __m512 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        const float* unit = xq.unit.data() + r0 * nb;
        const float* zterm = xq.zterm.data() + r0 * nb;
        for (int64_t b = 0; b < std::min<int64_t>(2, nb); ++b) {
          compute(b);
          drain(b);
        }
        for (int64_t b = 0; b < nb; ++b) {
          if (b + 2 < nb) compute(b + 2);
          __m512 s, z;
          load_scales(tsz + b * 2 * kRows, s, z);
          const int32_t* sb = sums[b % 3];
#pragma GCC unroll 16
          for (int r = 0; r < 16; ++r) {  // (unrolled: the accumulators stay in registers)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sb + r * 16)),
                                     _mm512_mul_ps(s, _mm512_set1_ps(unit[r * nb + b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(zterm[r * nb + b]), acc[r]);
          }
          if (b + 2 < nb) drain(b + 2);
        }
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) {  // (all 16, tested: a bound the compiler cannot unroll kept acc in memory)
          if (r0 + r < m) {
            const int64_t at = (r0 + r) * n + t * kRows;
            store(acc[r], out ? out + at : nullptr, out32 ? out32 + at : nullptr);
          }
        }
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
                     int64_t tiles, int64_t nb, int64_t isa, bool fp32) {
  const int64_t m = x.size(0), k = x.size(1), n = tiles * kRows, tile_bytes = nb * (Bits == 4 ? 4 : 8) * 64;
  auto y = torch::empty({m, n}, x.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  if (m == 0) return y;
  const bool tiles_path = isa == kIsaAmx && m > kGroup;
  const int64_t mpad = tiles_path ? (m + 15) / 16 * 16 : m;
  const Quantised& xq = quantise(x.data_ptr<at::BFloat16>(), m, k, x.stride(0), mpad, isa != 256, Bits == 8,
                                 tiles_path);
  at::BFloat16* out = fp32 ? nullptr : y.data_ptr<at::BFloat16>();
  float* out32 = fp32 ? y.data_ptr<float>() : nullptr;
#ifdef SOUVERAIN_AMX_INT8
  if (tiles_path) {
    souverain::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      tiles_amx<Bits>(xq, m, mpad, k, w, sz, row_scale, t0, t1, nb, out, out32, n);
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
            const int64_t v = r + i;
            x_rows.q[i] = xq.q.data() + v * 2 * k;
            x_rows.unit[i] = xq.unit.data() + v * nb;
            x_rows.zterm[i] = xq.zterm.data() + v * nb;
            x_rows.sum[i] = xq.sum.data() + v * nb;
            x_rows.total[i] = xq.total.data() + v * 2;
            x_rows.y[i] = fp32 ? nullptr : out + v * n + t * kRows;
            x_rows.yf[i] = fp32 ? out32 + v * n + t * kRows : nullptr;
          }
          pick<Bits>(wide, rows)(w + t * tile_bytes, sz ? sz + t * nb * 2 * kRows : nullptr,
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
  TORCH_CHECK(x.size(1) <= kMaxK, name, ": K is at most ", kMaxK, " (the integer sums stay within int32)");
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, int64_t isa, bool fp32) {
  check(x, codes, 4, isa, "q4_linear");
  const int64_t tiles = codes.size(0), nb = codes.size(1);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == tiles * nb * 2 * kRows,
              "q4_linear: scales must be bfloat16 [N/16, K/32, 2, 16] (pack_q4)");
  return linear<4>(x, codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>()),
                   nullptr, tiles, nb, isa, fp32);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t isa, bool fp32) {
  check(x, codes, 8, isa, "q8_linear");
  const int64_t tiles = codes.size(0), nb = codes.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == tiles * kRows,
              "q8_linear: scales must be float32 [N] (pack_q8)");
  return linear<8>(x, codes.data_ptr<uint8_t>(), nullptr, scales.data_ptr<float>(), tiles, nb, isa, fp32);
}

}  // namespace souverain
