// Merge of the split-KV partials of tree_attention (see tree_attention_cuda.cuh): per (token,
// q head) row, out = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s), over the
// splits whose weight is not 0 (empty splits have lse -inf and unwritten partials). Two ways,
// the same arithmetic in the same order (so the same bits):
// - merge_splits_kernel: a second launch, one warp per row (plain or PDL launch);
// - merge_if_last ("fused"): at the end of the attention kernel the CTA whose split of a
//   (request, kv head, row tile) group finishes last merges the group's rows.
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
// (batch padding) are untouched. Launched with PDL it may start before the attention kernel
// ends: nothing is read before grid_dependency_wait.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_splits_kernel(const __grid_constant__ TreeAttentionParams<T> p, const __grid_constant__ SplitKV sp) {
  grid_dependency_wait();
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

// ---- Fused merge: the last CTA of a group merges ----------------------------------------------
//
// Group g = (request * Hkv + kv head) * row_tiles + row tile: its num_splits CTAs each write
// their partials, then count themselves on g_merge_counters[g]; the CTA that counts last merges
// the group's rows and sets the counter back to 0, so the next launch (or CUDA-graph replay)
// starts from zero. Padded requests and unused row tiles leave the whole group early: none of
// its CTAs counts. The counters are static device memory (zeroed when the module loads, one
// array per device and translation unit): no allocation, nothing to capture. Two fused launches
// must not run at once on one device (two streams): they would share counters.
//
// Memory order (the CUTLASS semaphore pattern): the CTA's threads store their partials, a
// barrier orders them before thread 0's __threadfence (cumulative) and atomicAdd; the last CTA's
// thread 0 fences again after its atomicAdd (acquire) and a barrier hands that on to its
// threads, which read the partials with ld.global.cg (L2: no L1 line, say of a neighbouring
// group's log2-sum-exps read earlier on the same SM, can be stale).
constexpr int kMaxMergeGroups = 4096;  // groups of one fused launch at most (else: merge launch)
static __device__ unsigned int g_merge_counters[kMaxMergeGroups];

constexpr int kFusedHeaderBytes = 32;  // [kSplitsPerLane] used-split words, then the "last" flag

// Shared memory of the merging CTA (the tile's, free once every warp is past its last tile):
// header, s_inv [kBlockM] 1 / weight sum, s_w [kBlockM][stride] log2-sum-exps then weights.
template <typename Cfg>
constexpr int fused_merge_smem_bytes() {
  return kFusedHeaderBytes + Cfg::kBlockM * 4 + Cfg::kBlockM * (kMaxSplits + 1) * 4;
}

// Counts this CTA's arrival in its group (after every thread's partial stores); true in the CTA
// that arrives last, whose later loads then see every split's partials.
__device__ __forceinline__ bool arrive_last(const SplitKV& sp, int group, int* s_last) {
  __syncthreads();  // every thread's partial stores precede thread 0's release
  if (threadIdx.x == 0) {
    __threadfence();  // release: this CTA's partials before its count
    unsigned int* counter = &g_merge_counters[group];
    const bool last = atomicAdd(counter, 1u) == static_cast<unsigned int>(sp.num_splits - 1);
    if (last) {
      *counter = 0u;    // every split has counted: reset for the next launch / replay
      __threadfence();  // acquire: the other CTAs' partials before this CTA's reads
    }
    *s_last = last;
  }
  __syncthreads();
  return *s_last != 0;
}

// (token, q head) row of the group's row r.
__device__ __forceinline__ int group_row(const CtaWork& w, int num_q_heads, int r) {
  const int gr = w.row0 + r;
  return (w.q_start + gr / w.group) * num_q_heads + w.kv_head * w.group + gr % w.group;
}

// Log2-sum-exps of the group's rows x its first `splits` splits -> s_w [rows][stride] (all
// threads; kStage loads in flight per thread).
template <typename T, typename Cfg>
__device__ __forceinline__ void stage_group_lse(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                                const CtaWork& w, int rows, int splits, int stride,
                                                float* s_w) {
  constexpr int kStage = 8;
  const int64_t num_rows = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  const int total = splits * rows;
  for (int base = threadIdx.x; base < total; base += kStage * Cfg::kThreads) {
    float v[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * Cfg::kThreads;  // split i / rows, row i % rows
      v[u] = i < total ? __ldcg(sp.partial_lse + (i / rows) * num_rows + group_row(w, p.num_q_heads, i % rows))
                       : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int i = base + u * Cfg::kThreads;
      if (i < total) s_w[(i % rows) * stride + i / rows] = v[u];
    }
  }
}

// s_w's log2-sum-exps -> split weights in place, s_inv = 1 / weight sum, and s_used (bit s:
// split s has a weight in some row). One warp per row as in merge_splits_kernel (lane l holds
// splits l, l + 32, ...: the same sums in the same order); kRows rows per warp at once so
// their shuffle chains overlap.
template <typename Cfg>
__device__ __forceinline__ void group_split_weights(int rows, int num_splits, int stride, float* s_w,
                                                    float* s_inv, unsigned* s_used) {
  constexpr int kRows = 8;
  const int lane = threadIdx.x % 32;
  unsigned used = 0;  // bit i: split lane + 32 i has a weight in one of this warp's rows
  for (int r0 = threadIdx.x / 32; r0 < rows; r0 += kRows * Cfg::kWarps) {
    float lse_max[kRows], weight_sum[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      lse_max[k] = -INFINITY;
      weight_sum[k] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kSplitsPerLane; ++i) {
      if (32 * i >= num_splits) break;
      const int s = lane + 32 * i;
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        const int r = r0 + k * Cfg::kWarps;
        lse_max[k] = fmaxf(lse_max[k], s < num_splits && r < rows ? s_w[r * stride + s] : -INFINITY);
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m /= 2)  // warp_max of each row
#pragma unroll
      for (int k = 0; k < kRows; ++k) lse_max[k] = fmaxf(lse_max[k], __shfl_xor_sync(kFullWarp, lse_max[k], m));
#pragma unroll
    for (int i = 0; i < kSplitsPerLane; ++i) {
      if (32 * i >= num_splits) break;
      const int s = lane + 32 * i;
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        const int r = r0 + k * Cfg::kWarps;
        if (s >= num_splits || r >= rows) continue;
        const float lse = s_w[r * stride + s];
        const float weight = lse == -INFINITY ? 0.f : exp2f(lse - lse_max[k]);  // NaN rows stay NaN
        s_w[r * stride + s] = weight;
        weight_sum[k] += weight;
        if (weight != 0.f) used |= 1u << i;
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m /= 2)  // warp_sum of each row
#pragma unroll
      for (int k = 0; k < kRows; ++k) weight_sum[k] += __shfl_xor_sync(kFullWarp, weight_sum[k], m);
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      const int r = r0 + k * Cfg::kWarps;
      if (lane == 0 && r < rows) s_inv[r] = weight_sum[k] > 0.f ? 1.f / weight_sum[k] : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < kSplitsPerLane; ++i) {
    const unsigned bits = __ballot_sync(kFullWarp, (used >> i) & 1u);
    if (lane == 0 && bits != 0u) atomicOr(&s_used[i], bits);
  }
}

// out rows of the group = sum over the used splits (ascending) of weight * partial O, times
// s_inv. All threads: a thread takes float4 column `chunk` of kItems rows and reads kGather
// splits of each per round (kItems * kGather loads in flight).
template <typename T, typename Cfg>
__device__ __forceinline__ void merge_group_rows(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                                 const CtaWork& w, int rows, int stride, const float* s_w,
                                                 const float* s_inv, const unsigned* s_used) {
  constexpr int kChunks = Cfg::kHeadDim / 4;             // float4 columns of a row
  constexpr int kRowsPerPass = Cfg::kThreads / kChunks;  // rows the CTA covers per item
  constexpr int kItems = 8;
  constexpr int kGather = 2;
  static_assert(Cfg::kThreads % kChunks == 0, "a row's columns must tile the CTA");
  const int64_t num_rows = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  const int chunk = threadIdx.x % kChunks;
  for (int r0 = threadIdx.x / kChunks; r0 < rows; r0 += kItems * kRowsPerPass) {
    int row[kItems];  // (token, q head) row of item j; -1 past the group's rows
    float4 acc[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int r = r0 + j * kRowsPerPass;
      row[j] = r < rows ? group_row(w, p.num_q_heads, r) : -1;
      acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < kSplitsPerLane; ++i) {
      unsigned pending = s_used[i];  // CTA-uniform
      while (pending != 0u) {
        int src[kGather];
        float4 x[kGather][kItems];
#pragma unroll
        for (int u = 0; u < kGather; ++u) {
          src[u] = pending != 0u ? 32 * i + __ffs(pending) - 1 : -1;  // -1: none left
          pending &= pending - 1;
        }
#pragma unroll
        for (int u = 0; u < kGather; ++u)
#pragma unroll
          for (int j = 0; j < kItems; ++j) {
            const float4* o = reinterpret_cast<const float4*>(
                sp.partial_o + (static_cast<int64_t>(max(src[u], 0)) * num_rows + max(row[j], 0)) * Cfg::kHeadDim);
            x[u][j] = src[u] >= 0 && row[j] >= 0 ? __ldcg(o + chunk) : make_float4(0.f, 0.f, 0.f, 0.f);
          }
#pragma unroll
        for (int u = 0; u < kGather; ++u)
#pragma unroll
          for (int j = 0; j < kItems; ++j) {
            if (src[u] < 0 || row[j] < 0) continue;
            const float weight = s_w[(r0 + j * kRowsPerPass) * stride + src[u]];
            if (weight == 0.f) continue;  // as merge_splits_kernel: a row skips its 0-weight splits
            acc[j].x += weight * x[u][j].x;
            acc[j].y += weight * x[u][j].y;
            acc[j].z += weight * x[u][j].z;
            acc[j].w += weight * x[u][j].w;
          }
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (row[j] < 0) continue;
      const float inv = s_inv[r0 + j * kRowsPerPass];
      const int token = row[j] / p.num_q_heads, head = row[j] % p.num_q_heads;
      T* dst = p.out + static_cast<int64_t>(token) * p.out_stride_token +
               static_cast<int64_t>(head) * p.out_stride_head + chunk * 4;
      *reinterpret_cast<uint2*>(dst) = make_uint2(MmaOps<T>::pack(acc[j].x * inv, acc[j].y * inv),
                                                  MmaOps<T>::pack(acc[j].z * inv, acc[j].w * inv));
    }
  }
}

// The end of a fused-merge attention CTA (every thread, after its partial stores): counts the
// CTA in its group; the last one merges the group's rows into `out`. It reads only the splits
// that had tiles: the others wrote log2-sum-exp -inf, which changes neither the max nor the
// sums (the same bits); an invalid request's splits all wrote NaN rows.
template <typename T, typename Cfg>
__device__ __forceinline__ void merge_if_last(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                              const CtaWork& w, bool invalid) {
  static_assert(fused_merge_smem_bytes<Cfg>() <= Cfg::kSmemBytes, "the fused merge reuses the tile's smem");
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned* s_used = reinterpret_cast<unsigned*>(smem);               // [kSplitsPerLane]
  int* s_last = reinterpret_cast<int*>(smem) + kSplitsPerLane;        // 1
  float* s_inv = reinterpret_cast<float*>(smem + kFusedHeaderBytes);  // [kBlockM]
  float* s_w = s_inv + Cfg::kBlockM;                                  // [kBlockM][stride]
  const int group = (w.request * p.num_kv_heads + w.kv_head) * sp.row_tiles + w.row0 / Cfg::kBlockM;
  cp_async_wait<0>();  // no copy may still land in the shared memory reused below
  if (!arrive_last(sp, group, s_last)) return;
  const int rows = min(Cfg::kBlockM, w.rows - w.row0);
  const int splits = invalid ? sp.num_splits : w.live_splits;
  const int stride = splits | 1;  // odd: the staging stores hit distinct banks
  if (threadIdx.x < kSplitsPerLane) s_used[threadIdx.x] = 0u;
  stage_group_lse<T, Cfg>(p, sp, w, rows, splits, stride, s_w);
  __syncthreads();
  group_split_weights<Cfg>(rows, splits, stride, s_w, s_inv, s_used);
  __syncthreads();
  merge_group_rows<T, Cfg>(p, sp, w, rows, stride, s_w, s_inv, s_used);
}

}  // namespace cuda
}  // namespace medusa_vllm
