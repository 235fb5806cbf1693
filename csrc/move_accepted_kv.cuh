// CUDA core of move_accepted_kv: one thread per (layer, kv head, copy unit of head_dim) of a
// request (grid.y = request); each thread walks the accepted steps in ascending order, so the
// "destination of step k is the source of an earlier step" hazard is resolved in program
// order. Layer pointers travel by value in the kernel parameters (LayerTable).
#pragma once

#include "cuda_utils.cuh"
#include "move_accepted_kv.h"

namespace medusa_vllm {
namespace cuda {

constexpr int kMaxLayersPerLaunch = 64;  // 2 x 64 pointers = 1 KiB of kernel parameters
constexpr int kMoveThreads = 128;

struct LayerTable {
  char* k[kMaxLayersPerLaunch];
  char* v[kMaxLayersPerLaunch];
  int num_layers;
};

// Unit: the widest type (16, 4, 2 or 1 bytes) that divides head_bytes, the strides and the
// base pointers.
template <typename Unit>
__global__ void __launch_bounds__(kMoveThreads)
    move_accepted_kv_kernel(const __grid_constant__ MoveAcceptedParams p,
                            const __grid_constant__ LayerTable layers) {
  const int request = blockIdx.y;
  const int units_per_head = static_cast<int>(p.head_bytes / sizeof(Unit));
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t{layers.num_layers} * p.num_kv_heads * units_per_head) return;
  const int unit = static_cast<int>(idx % units_per_head);
  const int head = static_cast<int>((idx / units_per_head) % p.num_kv_heads);
  const int layer = static_cast<int>(idx / (int64_t{units_per_head} * p.num_kv_heads));
  char* k = layers.k[layer];
  char* v = layers.v[layer];

  const int q_start = p.query_start_loc[request];
  const int q_len = p.query_start_loc[request + 1] - q_start;
  for (int step = 0; step < p.num_accepted_cols; ++step) {
    int64_t src = 0, dst = 0;
    const MoveStep what = move_step(p, request, step, q_start, q_len, &src, &dst);
    if (what == MoveStep::kStop) break;
    if (what == MoveStep::kSkip) continue;
    // Same thread, ascending steps: a later read of an earlier destination sees the new value.
    reinterpret_cast<Unit*>(k + p.k_offset(dst, head))[unit] =
        reinterpret_cast<const Unit*>(k + p.k_offset(src, head))[unit];
    reinterpret_cast<Unit*>(v + p.v_offset(dst, head))[unit] =
        reinterpret_cast<const Unit*>(v + p.v_offset(src, head))[unit];
  }
}

}  // namespace cuda
}  // namespace medusa_vllm
