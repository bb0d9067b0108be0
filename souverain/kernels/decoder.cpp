// The decoder layers of a decode step (one new token per sequence) in one call.
//
// Between the kernels, the Python forward spends about 0.3 ms a layer on module calls, checks and
// views: on SmolLM2 (30 layers) ~9 ms of a ~21 ms batch-1 step. Here the same ops run in the same
// order on the same tensors, so the result is the Python path's to the bit (tests/kernels/
// test_decoder.py). What it covers is decided in Python (souverain/engine/fused.py): bf16 models
// with dense feed-forwards, no LoRA in the step, and shapes the kernels take; anything else keeps
// the Python path.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace souverain {
namespace {

// A projection in whichever forms its module holds, applied as the module's forward applies it:
// nn.Linear (`weight`), or QuantLinear (q4_linear's / q8_linear's codes for every row count; else torch's
// int4/int8 kernels, up to `dense_rows` rows where that is set (>= 0) and its dense copy beyond).
struct Linear {
  std::optional<at::Tensor> weight, qweight, scales, dense_t, codes, code_scales, bias;
  int64_t bits = 0, dense_rows = 0, group = 0, isa = 0;  // group: values per int4 scale; isa: q4_linear's

  at::Tensor operator()(const at::Tensor& x) const {
    if (weight) return at::linear(x, *weight, bias);
    at::Tensor y;
    if (codes) {
      y = bits == 4 ? q4_linear(x, *codes, *code_scales, isa) : q8_linear(x, *codes, *code_scales, isa);
    } else if (dense_rows >= 0 && x.size(0) > dense_rows) {
      y = at::matmul(x, *dense_t);
    } else if (bits == 4) {
      y = at::_weight_int4pack_mm_for_cpu(x, *qweight, group, *scales);
    } else {
      y = at::_weight_int8pack_mm(x, *qweight, *scales);
    }
    return bias ? at::add(y, bias->to(y.scalar_type())) : y;
  }
};

// A sparse mixture-of-experts feed-forward (souverain/model/moe.py's MoeFeedForward with its experts
// quantised): the router's logits (its nn.Linear, bf16), the k largest per token (largest first, the lower
// expert first among equal ones; NaN above all, as at::topk), their softmax in fp32 rounded to bf16; tokens
// grouped by expert (each token's slots in token order), each expert once on its group (gate_up, swiglu,
// down); each token's k outputs, each times its weight (rounded to bf16), added to zero in expert order in
// bf16. Plain loops between the projections: at batch 1 the ~25 ATen ops of the Python form (topk,
// softmax, argsort, bincount, index_select, cat, index_add...) took more than the experts' products
// (Mixtral-shaped model of bench/moe.py: 1.6x the dense model's decode step). MoeFeedForward's forward calls
// this object too, where it has one (souverain/model/quant.py's prepare): the same bits either way. Each
// token's result depends on its own row only: the same alone or in any batch.
struct Moe {
  Linear router;
  std::vector<Linear> gate_up, down;  // per expert: one [gate | up] projection, and the down projection
  int64_t top_k = 2;

  at::Tensor operator()(const at::Tensor& x_in) const {
    using bVec = at::vec::Vectorized<at::BFloat16>;
    using fVec = at::vec::Vectorized<float>;
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "Moe: x must be bfloat16 [N, dim]");
    const at::Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), d = x.size(1), experts = static_cast<int64_t>(gate_up.size()), k = top_k;
    at::Tensor out = at::zeros_like(x);
    if (n == 0) return out;
    const at::Tensor logits = router(x).to(at::kFloat).contiguous();
    TORCH_CHECK(logits.size(1) == experts, "Moe: the router gives ", logits.size(1), " logits, for ", experts,
                " experts");
    const float* lp = logits.data_ptr<float>();
    std::vector<int64_t> chosen(n * k), count(experts + 1, 0);
    std::vector<at::BFloat16> weight(n * k);
    std::vector<char> taken(experts);
    for (int64_t t = 0; t < n; ++t) {
      const float* row = lp + t * experts;
      std::fill(taken.begin(), taken.end(), 0);
      float top[64];
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; ++e) {
          if (taken[e]) continue;
          const float v = row[e];
          if (best < 0 || (std::isnan(v) && !std::isnan(row[best])) || v > row[best]) best = e;
        }
        taken[best] = 1;
        chosen[t * k + j] = best;
        top[j] = row[best];
        ++count[best + 1];
      }
      const float most = top[0];
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += (top[j] = std::exp(top[j] - most));
      for (int64_t j = 0; j < k; ++j) weight[t * k + j] = static_cast<at::BFloat16>(top[j] / sum);
    }
    // Slots grouped by expert, in token order within each: position p holds token slot[p] / k's row.
    for (int64_t e = 0; e < experts; ++e) count[e + 1] += count[e];
    std::vector<int64_t> slot(n * k), next(count.begin(), count.end() - 1);
    for (int64_t i = 0; i < n * k; ++i) slot[next[chosen[i]]++] = i;
    at::Tensor grouped = at::empty({n * k, d}, x.options());
    const auto* xp = x.data_ptr<at::BFloat16>();
    auto* gp = grouped.data_ptr<at::BFloat16>();
    for (int64_t p = 0; p < n * k; ++p) std::memcpy(gp + p * d, xp + slot[p] / k * d, d * sizeof(at::BFloat16));
    auto* op = out.data_ptr<at::BFloat16>();
    const std::vector<at::Tensor> ys = run_experts(grouped, count);
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t start = count[e], rows = count[e + 1] - start;
      if (rows == 0) continue;
      const at::Tensor& y = ys[e];
      TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.size(1) == d, "Moe: an expert's output must be bfloat16 [N, dim]");
      const auto* yp = y.data_ptr<at::BFloat16>();
      for (int64_t r = 0; r < rows; ++r) {  // out[token] += round(y * w), rounded: tokens' slots in expert order
        const int64_t i = slot[start + r];
        const float wf = static_cast<float>(weight[i]);
        const fVec w(wf);
        const at::BFloat16* src = yp + r * d;
        at::BFloat16* dst = op + i / k * d;
        int64_t c = 0;
        for (; c + bVec::size() <= d; c += bVec::size()) {
          const auto [y0, y1] = at::vec::convert_to_float<at::BFloat16>(bVec::loadu(src + c));
          const auto [p0, p1] = at::vec::convert_to_float<at::BFloat16>(
              at::vec::convert_from_float<at::BFloat16>(y0 * w, y1 * w));
          const auto [o0, o1] = at::vec::convert_to_float<at::BFloat16>(bVec::loadu(dst + c));
          at::vec::convert_from_float<at::BFloat16>(o0 + p0, o1 + p1).store(dst + c);
        }
        for (; c < d; ++c) {
          const float prod = static_cast<float>(static_cast<at::BFloat16>(static_cast<float>(src[c]) * wf));
          dst[c] = static_cast<at::BFloat16>(static_cast<float>(dst[c]) + prod);
        }
      }
    }
    return out;
  }

  // Each expert with rows on its group (gate_up, swiglu, down), contiguous. Where every expert runs on our
  // kernels, the experts are shared out between the pool's threads, each expert whole on one thread (its
  // products then run inline there: the same bits, since a product's outputs are each computed by one
  // thread whatever the split): one parallel loop per layer instead of several per expert, whose wake-ups
  // and joins were most of a small batch's MoE step. Threads get experts by longest-first to the least
  // loaded, an expert costing its rows plus a fixed share for reading its weights.
  std::vector<at::Tensor> run_experts(const at::Tensor& grouped, const std::vector<int64_t>& count) const {
    const int64_t experts = static_cast<int64_t>(gate_up.size());
    std::vector<at::Tensor> ys(experts);
    auto one = [&](int64_t e) {
      ys[e] = down[e](swiglu(gate_up[e](grouped.narrow(0, count[e], count[e + 1] - count[e])))).contiguous();
    };
    std::vector<int64_t> active;
    for (int64_t e = 0; e < experts; ++e) {
      if (count[e + 1] > count[e]) active.push_back(e);
    }
    const bool ours = std::all_of(active.begin(), active.end(), [&](int64_t e) {
      return gate_up[e].codes.has_value() && down[e].codes.has_value();
    });
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(active.size()));
    if (!ours || threads <= 1) {
      for (const int64_t e : active) one(e);
      return ys;
    }
    constexpr int64_t kWeightCost = 4;  // an expert's weight read, in rows' worth of work
    std::stable_sort(active.begin(), active.end(), [&](int64_t a, int64_t b) {
      return count[a + 1] - count[a] > count[b + 1] - count[b];
    });
    std::vector<std::vector<int64_t>> share(threads);
    std::vector<int64_t> load(threads, 0);
    for (const int64_t e : active) {
      const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
      share[t].push_back(e);
      load[t] += count[e + 1] - count[e] + kWeightCost;
    }
    std::vector<std::exception_ptr> failed(threads);
    souverain::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        try {
          for (const int64_t e : share[t]) one(e);
        } catch (...) {  // an exception must not leave a pool thread
          failed[t] = std::current_exception();
        }
      }
    });
    for (const auto& f : failed) {
      if (f) std::rethrow_exception(f);
    }
    return ys;
  }
};

struct Layer {
  at::Tensor attention_norm, ffn_norm;
  std::vector<Linear> qkv;      // one [q | k | v] projection, or q, k and v
  Linear wo;
  std::vector<Linear> gate_up;  // one [gate | up] projection, or gate and up (none with `moe`)
  std::optional<Linear> down;
  std::optional<Moe> moe;       // the feed-forward, where it is a mixture of experts
};

class Decoder {
 public:
  // Attention through paged_decode_attention on every backend: the tokens it decodes are generated ones,
  // which the engine's steps attend the same way (souverain/engine/kv_cache.py's TileSplit on AMX).
  Decoder(std::vector<Layer> layers, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps)
      : layers_(std::move(layers)), heads_(n_heads), kv_heads_(n_kv_heads), hd_(head_dim), eps_(eps) {
    for (const auto& l : layers_) {
      TORCH_CHECK(l.qkv.size() == 1 || l.qkv.size() == 3, "Decoder: a layer takes one qkv projection or three");
      TORCH_CHECK(l.moe ? l.moe->gate_up.size() == l.moe->down.size() && !l.moe->gate_up.empty()
                        : (l.gate_up.size() == 1 || l.gate_up.size() == 2) && l.down,
                  "Decoder: a layer takes one gate_up projection or two and a down projection, or a mixture of "
                  "experts with a gate_up and a down projection each");
    }
  }

  // h [N, D]: one token of each of N sequences; cos/sin [N, hd]; the caches hold every layer
  // (k [L, blocks, Hkv, hd, bs], v [L, slots, Hkv, hd]); slots [N] where this step's keys go;
  // tables [N, W], lo/hi [N]: each sequence's blocks and key range, as paged_decode_attention reads;
  // v_int8 [L, slots, Hkv, hd] and v_scale [L, slots, Hkv]: the values' int8 copy, which attention then reads.
  at::Tensor forward(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& tables,
                     const at::Tensor& lo, const at::Tensor& hi, int64_t block_size,
                     const std::optional<at::Tensor>& v_int8, const std::optional<at::Tensor>& v_scale) const {
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kBFloat16, "Decoder: h must be bfloat16 [N, dim]");
    TORCH_CHECK(k_cache.size(0) == static_cast<int64_t>(layers_.size()) && v_cache.size(0) == k_cache.size(0),
                "Decoder: the caches must hold one entry per layer");
    TORCH_CHECK(v_int8.has_value() == v_scale.has_value() &&
                    (!v_int8 || (v_int8->size(0) == k_cache.size(0) && v_scale->size(0) == k_cache.size(0))),
                "Decoder: v_int8 and v_scale go together, one entry per layer");
    const int64_t n = h.size(0), q_width = heads_ * hd_, kv_width = kv_heads_ * hd_;
    const double scale = std::pow(static_cast<double>(hd_), -0.5);
    // Each residual add goes with the norm after it (add_rms_norm), the last one alone: the same bits as
    // the separate ops.
    if (layers_.empty()) return h;
    at::Tensor a = rms_norm(h, layers_[0].attention_norm, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      const at::Tensor kc = k_cache[i], vc = v_cache[i];
      std::optional<at::Tensor> v8, vs;
      if (v_int8) {
        v8 = (*v_int8)[i];
        vs = (*v_scale)[i];
      }
      at::Tensor q, k, v;
      if (l.qkv.size() == 1) {
        const at::Tensor y = l.qkv[0](a);
        q = y.narrow(1, 0, q_width);
        k = y.narrow(1, q_width, kv_width);
        v = y.narrow(1, q_width + kv_width, kv_width);
      } else {
        q = l.qkv[0](a);
        k = l.qkv[1](a);
        v = l.qkv[2](a);
      }
      q = rope(q.view({n, heads_, hd_}), cos, sin);
      k = rope(k.view({n, kv_heads_, hd_}), cos, sin);
      store_kv(k, v.view({n, kv_heads_, hd_}), kc, vc, slots, v8, vs);
      const at::Tensor o = paged_decode_attention(q, kc, vc, tables, lo, hi, block_size, scale, {}, v8, vs);
      at::Tensor f;
      std::tie(h, f) = add_rms_norm(h, l.wo(o.view({n, q_width})), l.ffn_norm, eps_);
      at::Tensor out;
      if (l.moe) {
        out = (*l.moe)(f);
      } else {
        const at::Tensor g = l.gate_up.size() == 1 ? swiglu(l.gate_up[0](f)) : silu_mul(l.gate_up[0](f), l.gate_up[1](f));
        out = (*l.down)(g);
      }
      if (i + 1 < layers_.size()) {
        std::tie(h, a) = add_rms_norm(h, out, layers_[i + 1].attention_norm, eps_);
      } else {
        h = add_rows(h, out);
      }
    }
    return h;
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, hd_;
  double eps_;
};

}  // namespace

void bind_decoder(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "Linear", "a projection's forms (nn.Linear or QuantLinear), as its forward applies them")
      .def(py::init([](std::optional<at::Tensor> weight, std::optional<at::Tensor> qweight,
                       std::optional<at::Tensor> scales, std::optional<at::Tensor> dense_t,
                       std::optional<at::Tensor> codes, std::optional<at::Tensor> code_scales,
                       std::optional<at::Tensor> bias, int64_t bits, int64_t dense_rows, int64_t group, int64_t isa) {
             const bool q4 = codes && code_scales && q4_supported(isa);
             TORCH_CHECK(weight || (q4 && (bits == 4 || bits == 8)) ||
                             (qweight && scales && dense_t && (bits == 8 || (bits == 4 && group > 0))),
                         "Linear: give weight (nn.Linear), or codes with code_scales and an isa that runs here, "
                         "or qweight, scales and dense_t with bits 4 (and group) or 8 (QuantLinear)");
             return Linear{weight, qweight, scales, dense_t, codes, code_scales, bias, bits, dense_rows, group, isa};
           }),
           py::kw_only(), py::arg("weight") = py::none(), py::arg("qweight") = py::none(),
           py::arg("scales") = py::none(), py::arg("dense_t") = py::none(), py::arg("codes") = py::none(),
           py::arg("code_scales") = py::none(), py::arg("bias") = py::none(), py::arg("bits") = 0,
           py::arg("dense_rows") = -1, py::arg("group") = 0, py::arg("isa") = 0)
      .def("__call__", &Linear::operator(), py::arg("x"));
  py::class_<Moe>(m, "Moe", "a mixture-of-experts feed-forward's router and experts, as its forward applies them")
      .def(py::init([](Linear router, std::vector<Linear> gate_up, std::vector<Linear> down, int64_t top_k) {
             TORCH_CHECK(!gate_up.empty() && gate_up.size() == down.size() && top_k > 0 &&
                             top_k <= static_cast<int64_t>(std::min<size_t>(gate_up.size(), 64)),
                         "Moe: one gate_up and one down projection per expert, and 0 < top_k <= min(experts, 64)");
             return Moe{router, std::move(gate_up), std::move(down), top_k};
           }),
           py::kw_only(), py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("top_k"))
      .def("__call__", &Moe::operator(), py::arg("x"), py::call_guard<py::gil_scoped_release>());
  py::class_<Layer>(m, "Layer", "one decoder layer's weights")
      .def(py::init([](at::Tensor attention_norm, at::Tensor ffn_norm, std::vector<Linear> qkv, Linear wo,
                       std::vector<Linear> gate_up, std::optional<Linear> down, std::optional<Moe> moe) {
             return Layer{attention_norm, ffn_norm, std::move(qkv), wo, std::move(gate_up), down, moe};
           }),
           py::kw_only(), py::arg("attention_norm"), py::arg("ffn_norm"), py::arg("qkv"), py::arg("wo"),
           py::arg("gate_up") = std::vector<Linear>{}, py::arg("down") = py::none(), py::arg("moe") = py::none());
  py::class_<Decoder>(m, "Decoder", "the decoder layers of a decode step, in one call")
      .def(py::init<std::vector<Layer>, int64_t, int64_t, int64_t, double>(), py::arg("layers"),
           py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"))
      .def("forward", &Decoder::forward, py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("slots"), py::arg("tables"), py::arg("lo"), py::arg("hi"),
           py::arg("block_size"), py::arg("v_int8") = py::none(), py::arg("v_scale") = py::none(),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace souverain
