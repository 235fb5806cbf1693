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
#include "target_probs_cpu.h"

namespace medusa_vllm {
using cpu::RowParams;
using cpu::target_probs_row;

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
