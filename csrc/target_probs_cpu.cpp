// CPU host function of target_probs: a row per task (at::parallel_for), the passes of
// target_probs.h in order over the row (checks in host_checks.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
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

// The radix select of target_probs.h (4 byte passes) over weight_of(i) of every token.
template <typename Weight>
Selected radix_select(const uint32_t* keys, int64_t n, uint64_t target, Weight weight_of) {
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0;
  uint64_t hist[256];
  int byte = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint64_t& h : hist) h = 0;
    for (int64_t i = 0; i < n; ++i) {
      if ((keys[i] & mask) != prefix) continue;
      hist[(keys[i] >> shift) & 0xFFu] += weight_of(i);
    }
    byte = select_byte(hist, above, target);
    prefix |= static_cast<uint32_t>(byte) << shift;
    mask |= 0xFFu << shift;
  }
  return Selected{prefix, above, hist[byte]};
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
  auto min_p_e = [&](float xi) {  // e, or 0 where min-p drops the token
    const float e = std::exp(xi - m);
    return (rp.min_p > 0.f && e < rp.min_p) ? 0.f : e;
  };
  // out holds e_i, 0 where a filter drops the token
  for (int64_t i = 0; i < vocab; ++i) out[i] = min_p_e(x[i]);
  // keeps out[i] only for keys above b, and for the first b.keep tokens with key == b.key
  auto apply = [&](Boundary b) {
    uint64_t tied = 0;
    for (int64_t i = 0; i < vocab; ++i)
      if (keys[i] < b.key || (keys[i] == b.key && tied++ >= b.keep)) out[i] = 0.f;
  };
  Boundary boundary{0, UINT64_MAX};  // no filter: every token
  if (rp.top_k > 0 && rp.top_k < vocab) {
    const Selected s = radix_select(keys.data(), vocab, static_cast<uint64_t>(rp.top_k),
                                    [](int64_t) { return uint64_t{1}; });
    boundary = Boundary{s.key, static_cast<uint64_t>(rp.top_k) - s.above};
    apply(boundary);
  }
  if (rp.top_p < 1.f) {
    const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
    uint64_t total = 0;
    for (int64_t i = 0; i < vocab; ++i) total += fixed_mass(out[i], scale);
    const uint64_t target = top_p_target(rp.top_p, total);
    const Selected s = radix_select(keys.data(), vocab, target, [&](int64_t i) { return fixed_mass(out[i], scale); });
    const uint64_t tie = fixed_mass(min_p_e(key_value(s.key)), scale);
    boundary = combine(boundary, Boundary{s.key, top_p_ties_kept(target, s.above, tie)});
    apply(boundary);
  }
  double z = 0.0;  // (a float32 running sum over ~1e5 tokens drifts by ~1e-4)
  for (int64_t i = 0; i < vocab; ++i) z += out[i];
  const float inv = 1.f / static_cast<float>(z);
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
