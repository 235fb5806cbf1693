// CPU host function of target_probs: a row per task (at::parallel_for), the passes of
// target_probs.h in order over the row (checks in host_checks.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <vector>

#include "host_checks.h"
#include "ops.h"
#include "target_probs.h"

namespace medusa_vllm {
namespace {

struct RowParams {
  float temperature;
  int64_t top_k;   // off: >= vocab
  float top_p;     // off: >= 1
  float min_p;     // off: <= 0
};

// The largest key t with weight(keys >= t) >= target among the candidates (4 byte passes).
template <typename W, typename Candidate>
uint32_t radix_select(const uint32_t* keys, int64_t n, W target, Candidate weight_of) {
  uint32_t prefix = 0, mask = 0;
  W above = 0;
  W hist[256];
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (W& h : hist) h = 0;
    for (int64_t i = 0; i < n; ++i) {
      if ((keys[i] & mask) != prefix) continue;
      hist[(keys[i] >> shift) & 0xFFu] += weight_of(i);
    }
    prefix |= static_cast<uint32_t>(select_byte(hist, above, target)) << shift;
    mask |= 0xFFu << shift;
  }
  return prefix;
}

template <typename T>
void target_probs_row(const T* logits, float* out, int64_t vocab, const RowParams& rp,
                      std::vector<float>& x, std::vector<uint32_t>& keys) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    x[i] = static_cast<float>(logits[i]) / rp.temperature;
    keys[i] = order_key(x[i]);
    m = std::max(m, x[i]);
  }
  if (m == -std::numeric_limits<float>::infinity()) {  // nothing to sample (softmax gives NaN too)
    for (int64_t i = 0; i < vocab; ++i) out[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  // out holds e_i, then 0 where a filter drops the token
  for (int64_t i = 0; i < vocab; ++i) {
    const float e = std::exp(x[i] - m);
    out[i] = (rp.min_p > 0.f && e < rp.min_p) ? 0.f : e;
  }
  if (rp.top_k > 0 && rp.top_k < vocab) {
    const uint32_t t = radix_select<int64_t>(keys.data(), vocab, rp.top_k, [](int64_t) { return int64_t{1}; });
    for (int64_t i = 0; i < vocab; ++i)
      if (keys[i] < t) out[i] = 0.f;
  }
  if (rp.top_p < 1.f) {
    const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
    uint64_t total = 0;
    for (int64_t i = 0; i < vocab; ++i) total += fixed_mass(out[i], scale);
    const uint32_t t = radix_select<uint64_t>(keys.data(), vocab, top_p_target(rp.top_p, total),
                                              [&](int64_t i) { return fixed_mass(out[i], scale); });
    for (int64_t i = 0; i < vocab; ++i)
      if (keys[i] < t) out[i] = 0.f;
  }
  float z = 0.f;
  for (int64_t i = 0; i < vocab; ++i) z += out[i];
  const float inv = 1.f / z;
  for (int64_t i = 0; i < vocab; ++i) out[i] *= inv;
}

}  // namespace

at::Tensor target_probs_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                            const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                            const c10::optional<at::Tensor>& min_p) {
  check_target_probs_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.device().is_cpu(), "target_probs_cpu: logits must be a CPU tensor");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows, vocab}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const TargetProbsParams params(temperature, top_k, top_p, min_p);
  const float* temp = params.temperature_ptr();
  const int32_t* k = params.top_k_ptr();
  const float* p = params.top_p_ptr();
  const float* mp = params.min_p_ptr();
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "target_probs_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, rows, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(vocab);
      std::vector<uint32_t> keys(vocab);
      for (int64_t r = begin; r < end; ++r) {
        const RowParams rp{temp[r], k ? k[r] : vocab, p ? p[r] : 1.f, mp ? mp[r] : 0.f};
        target_probs_row(base + r * row_stride, o + r * vocab, vocab, rp, x, keys);
      }
    });
  });
  return out;
}

}  // namespace medusa_vllm
