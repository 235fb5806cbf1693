// CUDA host function of rejection_walk: checks, a request per 1024-thread block (kernel in
// rejection_walk_cuda.cuh); no allocation besides the outputs, no host sync (CUDA-graph capturable).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "host_checks.h"
#include "ops.h"
#include "rejection_walk_cuda.cuh"

namespace medusa_vllm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_walk_cuda(
    const at::Tensor& logits, const at::Tensor& row_of_node, const at::Tensor& children, const at::Tensor& drafts,
    const at::Tensor& valid, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p, const at::Tensor& accept_u,
    const at::Tensor& final_u) {
  check_rejection_walk_args(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                            accept_u, final_u, kMaxChildren);
  TORCH_CHECK(logits.is_cuda(), "rejection_walk_cuda: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const RejectionWalkArgs a(row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p, accept_u, final_u);
  if (a.batch == 0) return a.outputs();
  const WalkParams p = make_walk_params(logits, a);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rejection_walk_cuda", [&] {
    cuda::rejection_walk_kernel<scalar_t><<<static_cast<unsigned>(a.batch), cuda::kThreads,
                                            sizeof(cuda::WalkShared), stream>>>(logits.data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.outputs();
}

}  // namespace medusa_vllm
