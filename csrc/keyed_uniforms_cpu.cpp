// CPU host function of keyed_uniforms (checks in host_checks.h, the hash in keyed_uniforms.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "host_checks.h"
#include "keyed_uniforms.h"
#include "ops.h"

namespace medusa_vllm {

at::Tensor keyed_uniforms_cpu(const at::Tensor& keys, int64_t n) {
  check_keyed_uniforms_args(keys, n);
  TORCH_CHECK(keys.device().is_cpu(), "keyed_uniforms_cpu: keys must be a CPU tensor");
  const int64_t rows = keys.size(0);
  at::Tensor out = at::empty({rows, n}, keys.options().dtype(at::kFloat));
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t stride = keys.stride(0);
  float* u = out.data_ptr<float>();
  at::parallel_for(0, rows, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t x = keyed_state(k[r * stride], k[r * stride + 1]);
      for (int64_t j = 0; j < n; ++j) u[r * n + j] = keyed_uniform(x, j);
    }
  });
  return out;
}

}  // namespace medusa_vllm
