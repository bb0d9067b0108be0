// The kernels' entry points, for the sources that call one another (cpu.cpp binds them all).
#pragma once

#include <torch/extension.h>

#include <functional>
#include <optional>
#include <tuple>

namespace souverain {

// pool.cpp: f(chunk begin, chunk end) over the kernels' own thread pool, split as at::parallel_for splits.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

// cpu.cpp
bool decode_supported(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t block_size);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor k_start, torch::Tensor k_end,
                                     int64_t block_size, double scale,
                                     std::vector<std::pair<int64_t, int64_t>> runs = {},
                                     std::optional<torch::Tensor> v_int8 = std::nullopt,
                                     std::optional<torch::Tensor> v_scale = std::nullopt);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rows(torch::Tensor x, torch::Tensor r);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor r, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor a, torch::Tensor b);
torch::Tensor swiglu(torch::Tensor gu);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
// v_int8/v_scale: the values' int8 copy that paged_decode_attention may read instead (bfloat16 caches only)
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
              std::optional<torch::Tensor> v_int8 = std::nullopt, std::optional<torch::Tensor> v_scale = std::nullopt);
torch::Tensor argmax_rows(torch::Tensor x);

// gemm.cpp
bool amx_available();
// glu: the weight is a fused [gate | up] projection; return silu(gate) * up (the halves' columns).
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, bool glu = false);
// x times q4_linear's int4 codes (q4.cpp's layout, N a multiple of 32) dequantised to bf16, fp32 sums; isa 1024:
// AMX tiles, 512: AVX-512 BF16 vector products (bf16_supported says which run here)
bool bf16_supported(int64_t isa);
torch::Tensor q4_linear_bf16(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, bool glu, int64_t isa);

// prefill.cpp; isa 1024: AMX tiles, 512: AVX-512 BF16 vector products
bool prefill_supported(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t isa);
void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                       std::vector<std::pair<int64_t, int64_t>> spans, double scale, int64_t isa);
void prefill_attention_cached(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor out,
                              std::vector<std::tuple<int64_t, int64_t, int64_t>> spans, torch::Tensor tables,
                              int64_t block_size, double scale, int64_t isa);

// q4.cpp: isa 1024 (AMX tiles beyond 4 rows, AVX-512 VNNI up to 4), 512 (AVX-512 VNNI) or 256 (AVX2)
bool q4_supported(int64_t isa);
// x is read to 11 bits per 32 values (two int8 parts); fp32: the output in float32 (logits), else rounded to bfloat16
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor sz, int64_t isa, bool fp32 = false);
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t isa, bool fp32 = false);

// decoder.cpp
void bind_decoder(pybind11::module& m);

}  // namespace souverain
