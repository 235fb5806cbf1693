// CUDA host function and kernel of keyed_uniforms: one thread per draw (the hash in
// keyed_uniforms.h; each thread recomputes its key's state, three fmix32 rounds: cheaper than a
// second pass). Graph-capturable: no host sync, no allocation besides the output.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "host_checks.h"
#include "keyed_uniforms.h"
#include "ops.h"

namespace medusa_vllm {
namespace {

__global__ void keyed_uniforms_kernel(const int64_t* __restrict__ keys, int64_t key_stride,
                                      float* __restrict__ out, int64_t rows, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * n) return;
  const int64_t r = i / n;
  out[i] = keyed_uniform(keyed_state(keys[r * key_stride], keys[r * key_stride + 1]), i - r * n);
}

}  // namespace

at::Tensor keyed_uniforms_cuda(const at::Tensor& keys, int64_t n) {
  check_keyed_uniforms_args(keys, n);
  TORCH_CHECK(keys.is_cuda(), "keyed_uniforms_cuda: keys must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t rows = keys.size(0);
  at::Tensor out = at::empty({rows, n}, keys.options().dtype(at::kFloat));
  const int64_t total = rows * n;
  if (total == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  keyed_uniforms_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream(keys.get_device())>>>(
      keys.data_ptr<int64_t>(), keys.stride(0), out.data_ptr<float>(), rows, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace medusa_vllm
