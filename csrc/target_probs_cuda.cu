// CUDA host function of target_probs: checks, a row per 1024-thread block (kernel in
// target_probs_cuda.cuh); no allocation besides the output, no host sync (CUDA-graph capturable).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "host_checks.h"
#include "ops.h"
#include "target_probs_cuda.cuh"

namespace medusa_vllm {

at::Tensor target_probs_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                             const c10::optional<at::Tensor>& min_p) {
  check_target_probs_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.is_cuda(), "target_probs_cuda: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows, vocab}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const TargetProbsParams params(temperature, top_k, top_p, min_p);
  const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "target_probs_cuda", [&] {
    const unsigned blocks = static_cast<unsigned>(rows);
    cuda::target_probs_kernel<scalar_t><<<blocks, cuda::kThreads, sizeof(cuda::Shared), stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<float>(), vocab, params.temperature_ptr(),
        params.top_k_ptr(), params.top_p_ptr(), params.min_p_ptr(), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace medusa_vllm
