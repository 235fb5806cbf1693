// Merge of the split-KV partials of tree_attention (see tree_attention_cuda.cuh): per (token,
// q head) row, out = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s), over the
// splits whose weight is not 0 (empty splits have lse -inf and unwritten partials).
#pragma once

#include <cmath>

#include "cuda_utils.cuh"
#include "paged_kv.h"
#include "tree_attention_cuda_tiles.cuh"

namespace medusa_vllm {
namespace cuda {

constexpr int kMergeWarps = 4;
constexpr int kSplitsPerLane = kMaxSplits / 32;
constexpr int kMergeGather = 4;  // non-empty splits whose partials one round reads
static_assert(kMaxSplits % 32 == 0, "the merge gives each lane kMaxSplits / 32 splits");

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, m));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(kFullWarp, x, m);
  return x;
}

// Combines the split partials of each (token, q head) row: one warp per row. The lanes read
// the log2-sum-exps of splits lane, lane + 32, ... in one round of loads (a small batch gets up
// to a full wave of splits, most of them empty: -inf), then add the partial O of the non-empty
// splits only, kHeadDim / 32 consecutive elements per lane. Tokens past query_start_loc[B]
// (batch padding) are untouched.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_splits_kernel(const __grid_constant__ TreeAttentionParams<T> p, const __grid_constant__ SplitKV sp) {
  constexpr int kPerLane = kHeadDim / 32;
  const int64_t num_rows = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) return;  // whole warps leave: the shuffles below see all 32 lanes
  const int token = static_cast<int>(row / p.num_q_heads);
  const int head = static_cast<int>(row % p.num_q_heads);
  if (token >= p.query_start_loc[p.num_requests]) return;

  float weight[kSplitsPerLane];  // log2-sum-exp, then the split's weight (0: empty split)
  float lse_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kSplitsPerLane; ++i) {
    const int s = lane + 32 * i;
    weight[i] = s < sp.num_splits ? sp.partial_lse[s * num_rows + row] : -INFINITY;
    lse_max = fmaxf(lse_max, weight[i]);
  }
  lse_max = warp_max(lse_max);
  float weight_sum = 0.f;
#pragma unroll
  for (int i = 0; i < kSplitsPerLane; ++i) {
    weight[i] = weight[i] == -INFINITY ? 0.f : exp2f(weight[i] - lse_max);  // NaN rows stay NaN
    weight_sum += weight[i];
  }
  weight_sum = warp_sum(weight_sum);

  float acc[kPerLane] = {};
#pragma unroll
  for (int i = 0; i < kSplitsPerLane; ++i) {
    if (32 * i >= sp.num_splits) break;
    unsigned pending = __ballot_sync(kFullWarp, weight[i] != 0.f);  // warp-uniform
    while (pending != 0u) {  // kMergeGather splits per round: their loads issue together
      int src[kMergeGather];
      float w[kMergeGather], x[kMergeGather][kPerLane];
#pragma unroll
      for (int u = 0; u < kMergeGather; ++u) {
        src[u] = __ffs(pending) - 1;  // -1: none left
        pending &= pending - 1;
        w[u] = __shfl_sync(kFullWarp, weight[i], max(src[u], 0));
      }
#pragma unroll
      for (int u = 0; u < kMergeGather; ++u) {
        const float* o = sp.partial_o + ((32 * i + max(src[u], 0)) * num_rows + row) * kHeadDim + lane * kPerLane;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) x[u][k] = src[u] >= 0 ? o[k] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kMergeGather; ++u)
#pragma unroll
        for (int k = 0; k < kPerLane; ++k)
          if (src[u] >= 0) acc[k] += w[u] * x[u][k];
    }
  }
  const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
  T* dst = p.out + static_cast<int64_t>(token) * p.out_stride_token +
           static_cast<int64_t>(head) * p.out_stride_head + lane * kPerLane;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) dst[k] = MmaOps<T>::from_float(acc[k] * inv);
}

}  // namespace cuda
}  // namespace medusa_vllm
