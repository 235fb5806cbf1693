// CUDA host function of move_accepted_kv: checks, copy-unit choice, launches (kernel in
// move_accepted_kv.cuh).
//
// Layer pointers travel by value in the kernel parameters (LayerTable, up to
// kMaxLayersPerLaunch layers per launch; more layers take several launches). Nothing is
// uploaded or cached on the device, so the op is CUDA-graph capturable as is: a replay uses
// the pointers of capture time, which is right because vLLM never reallocates its KV cache.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "host_checks.h"
#include "move_accepted_kv.cuh"
#include "ops.h"

namespace medusa_vllm {
namespace cuda {

int copy_unit_bytes(const MoveAcceptedParams& p, at::TensorList k_caches, at::TensorList v_caches) {
  for (const int unit : {16, 4, 2}) {
    bool ok = p.head_bytes % unit == 0;
    for (const int64_t stride : {p.k_stride_block, p.k_stride_token, p.k_stride_head, p.v_stride_block,
                                 p.v_stride_token, p.v_stride_head})
      ok = ok && stride % unit == 0;
    for (size_t l = 0; l < k_caches.size(); ++l) {
      ok = ok && reinterpret_cast<uintptr_t>(k_caches[l].data_ptr()) % unit == 0 &&
           reinterpret_cast<uintptr_t>(v_caches[l].data_ptr()) % unit == 0;
    }
    if (ok) return unit;
  }
  return 1;
}

template <typename Unit>
void launch_move(const MoveAcceptedParams& p, const LayerTable& layers, cudaStream_t stream) {
  const int64_t threads = int64_t{layers.num_layers} * p.num_kv_heads * (p.head_bytes / sizeof(Unit));
  const dim3 grid(static_cast<unsigned>((threads + kMoveThreads - 1) / kMoveThreads), p.num_requests);
  move_accepted_kv_kernel<Unit><<<grid, kMoveThreads, 0, stream>>>(p, layers);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda

void move_accepted_kv_cuda(at::TensorList k_caches, at::TensorList v_caches,
                           const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                           const at::Tensor& accepted) {
  const MoveAcceptedParams p =
      check_move_accepted_args(k_caches, v_caches, slot_mapping, query_start_loc, accepted);
  TORCH_CHECK(k_caches[0].is_cuda(), "move_accepted_kv_cuda: inputs must be CUDA tensors");
  check_unit_head_stride(k_caches[0], "move_accepted_kv: k_caches[0]");
  check_unit_head_stride(v_caches[0], "move_accepted_kv: v_caches[0]");
  TORCH_CHECK(accepted.size(0) <= 65535, "move_accepted_kv (CUDA): at most 65535 requests");
  if (p.num_requests == 0 || p.num_accepted_cols == 0) return;

  const c10::cuda::CUDAGuard guard(k_caches[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(k_caches[0].get_device());
  const int unit = cuda::copy_unit_bytes(p, k_caches, v_caches);
  const int num_layers = static_cast<int>(k_caches.size());
  for (int first = 0; first < num_layers; first += cuda::kMaxLayersPerLaunch) {
    cuda::LayerTable layers{};
    layers.num_layers = std::min(cuda::kMaxLayersPerLaunch, num_layers - first);
    for (int l = 0; l < layers.num_layers; ++l) {
      layers.k[l] = static_cast<char*>(k_caches[first + l].data_ptr());
      layers.v[l] = static_cast<char*>(v_caches[first + l].data_ptr());
    }
    switch (unit) {
      case 16:
        cuda::launch_move<uint4>(p, layers, stream);
        break;
      case 4:
        cuda::launch_move<uint32_t>(p, layers, stream);
        break;
      case 2:
        cuda::launch_move<uint16_t>(p, layers, stream);
        break;
      default:
        cuda::launch_move<uint8_t>(p, layers, stream);
    }
  }
}

}  // namespace medusa_vllm
