// What the AMX kernels share (gemm.cpp, prefill.cpp; cpu.cpp its bf16 rounding): whether this build has AMX, the tile
// configuration, the step of a 32 x 32 output block (four accumulator tiles) and the fp32 -> bf16
// rounding. SOUVERAIN_AMX is defined where the compiler targets
// AMX (-march=native on an AMX CPU); `amx_available()` (gemm.cpp) says whether the OS grants it.
#pragma once

#include <torch/extension.h>

#include <cstdint>

// The tiles' operand layout and the rounding, also for prefill.cpp's AVX-512 BF16 products.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SOUVERAIN_BF16 1
#include <immintrin.h>

namespace souverain::amx {

constexpr int64_t kTile = 16 * 32;     // bf16 values in one tile: 16 rows of 64 bytes
constexpr int64_t kBlock = 2 * kTile;  // two tiles side by side: 32 columns of a packed operand

// 32 fp32 values to bf16, rounding to nearest even (as ATen's conversion).
inline __m512i to_bf16(__m512 lo, __m512 hi) {
  const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
  return reinterpret_cast<const __m512i&>(v);
}

// 16 fp32 values rounded to bf16 and back (nearest even, as ATen's conversion).
inline __m512 round_bf16(__m512 v) {
  const __m256bh b = _mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b)), 16));
}

}  // namespace souverain::amx
#endif

#if defined(SOUVERAIN_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SOUVERAIN_AMX 1

namespace souverain::amx {

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators (rows 0-15 x cols 0-15, x 16-31, rows 16-31 x 0-15, x 16-31);
// 4, 5: the left operand's rows 0-15 and 16-31; 6, 7: the right operand's two column halves.
inline void configure(int rows0, int rows1) {
  TileConfig cfg;
  const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&cfg);
}

// `two`: both row halves (32 rows); else rows 0-15 only, tiles 2, 3 and 5 untouched (configure(rows, 0)).
inline void zero_accumulators(bool two = true) {
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

// Accumulators += a (32 rows of 32 bf16 values, rows `lda` values apart) times the two tiles at b
// (32 columns: a packed block, in VNNI order).
inline void multiply_block(const at::BFloat16* a, int64_t lda, const at::BFloat16* b, bool two = true) {
  const int64_t stride = lda * static_cast<int64_t>(sizeof(at::BFloat16));
  _tile_loadd(4, a, stride);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + kTile, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if (two) {
    _tile_loadd(5, a + 16 * lda, stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// The four accumulator tiles into a 32 x 32 fp32 block of a matrix with rows `ld` floats apart.
inline void store_accumulators(float* acc, int64_t ld, bool two = true) {
  const int64_t stride = ld * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + 16, stride);
  if (two) {
    _tile_stored(2, acc + 16 * ld, stride);
    _tile_stored(3, acc + 16 * ld + 16, stride);
  }
}

}  // namespace souverain::amx
#endif
