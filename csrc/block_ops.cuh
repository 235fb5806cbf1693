// Block-wide collectives of the 1024-thread kernels (target_probs, rejection_walk): reductions in
// a fixed shuffle order (the same float on every run) and an exclusive scan. Pure CUDA (no
// ATen), so tests/kernels/cuda_emulation runs them on a CPU.
#pragma once

namespace medusa_vllm {
namespace cuda {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;
static_assert(kWarps == 32, "block_reduce: one warp reduces the warps' partials");

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

// A block-wide reduction in a fixed order (the same shuffle tree every call: the same float on
// every run); `slots` holds the warps' partials.
template <typename V, typename Op>
__device__ V block_reduce(V v, V* slots, Op op) {
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = slots[threadIdx.x];  // kWarps == 32
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
    if (threadIdx.x == 0) slots[0] = v;
  }
  __syncthreads();
  v = slots[0];
  __syncthreads();
  return v;
}

// Exclusive prefix sum over the block's threads in thread order; `total` gets the block's sum
// (an unsigned integer type: the sum does not depend on the order).
template <typename U>
__device__ U block_exclusive_sum(U v, U* slots, U& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  U incl = v;
  for (int off = 1; off < 32; off <<= 1) {
    const U o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) slots[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    U w = slots[lane];  // kWarps == 32
    for (int off = 1; off < 32; off <<= 1) {
      const U o = __shfl_up_sync(kFull, w, off);
      if (lane >= off) w += o;
    }
    slots[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const U before = (warp == 0 ? U{0} : slots[warp - 1]) + incl - v;
  total = slots[kWarps - 1];
  __syncthreads();  // slots are reused by the next call
  return before;
}

}  // namespace cuda
}  // namespace medusa_vllm
