// Host-side launch of the tree_attention CUDA kernels: tile-config choice, split-KV choice,
// workspace, launch. Instantiated per dtype in tree_attention_cuda_{bf16,fp16}.cu.
//
// CUDA-graph safety: the grid and the workspace size depend only on host ints (N, B, Hkv,
// Q_MAX, num_splits, block_table width, SM count); per-request KV ranges are computed on the
// device from seq_lens.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>

#include "tree_attention_cuda.cuh"

namespace medusa_vllm {
namespace cuda {

constexpr int64_t kMaxWorkspaceBytes = int64_t{1} << 30;  // fp32 partials cap
constexpr int kMaxDevices = 64;

inline int sm_count(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "tree_attention: device index ", device, " out of range");
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, typename Cfg>
int blocks_per_sm() {
  static const int n = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, tree_attention_kernel<T, Cfg>, Cfg::kThreads, Cfg::kSmemBytes));
    return std::max(blocks, 1);
  }();
  return n;
}

// No split once the grid gives every SM a CTA (a split costs fp32 partials and the merge: in
// vLLM on the H100, batch 32 x 64-node trees, two splits made the step's attention 25% slower);
// below that, splits up to about one full wave of CTAs, never more than the longest possible
// context (block_table width) can feed with kMinKeysPerSplit keys each.
template <typename T, typename Cfg>
int choose_splits(const TreeAttentionParams<T>& p, int row_tiles, int64_t requested,
                  int64_t max_context, int device) {
  int64_t splits = requested;
  if (splits <= 0) {
    const int64_t ctas = int64_t{p.num_requests} * p.num_kv_heads * row_tiles;
    const int64_t target = int64_t{sm_count(device)} * blocks_per_sm<T, Cfg>();
    const int64_t useful = std::max<int64_t>(1, (max_context + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
    splits = ctas >= sm_count(device) ? 1 : std::min((target + ctas - 1) / ctas, useful);
  }
  splits = std::clamp<int64_t>(splits, 1, kMaxSplits);
  const int64_t bytes_per_split = int64_t{p.num_tokens} * p.num_q_heads * (p.head_dim + 1) * 4;
  while (splits > 1 && splits * bytes_per_split > kMaxWorkspaceBytes) splits /= 2;
  return static_cast<int>(splits);
}

template <typename T, typename Cfg>
void launch_tree_attention(const TreeAttentionParams<T>& p, int q_max, int64_t max_context,
                           int64_t num_splits, const at::Tensor& like) {
  const int device = like.get_device();
  auto kernel = tree_attention_kernel<T, Cfg>;
  // Before the occupancy query in choose_splits: the tile needs > 48 KiB of shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const int row_tiles = make_split_kv<Cfg>(p, q_max, 1).row_tiles;
  const int splits = choose_splits<T, Cfg>(p, row_tiles, num_splits, max_context, device);
  SplitKV sp = make_split_kv<Cfg>(p, q_max, splits);
  at::Tensor partial_o, partial_lse;  // keep the workspace alive until the launches are queued
  if (splits > 1) {
    const auto options = like.options().dtype(at::kFloat);
    partial_o = at::empty({splits, p.num_tokens, p.num_q_heads, p.head_dim}, options);
    partial_lse = at::empty({splits, p.num_tokens, p.num_q_heads}, options);
    sp.partial_o = partial_o.data_ptr<float>();
    sp.partial_lse = partial_lse.data_ptr<float>();
  }

  const int64_t grid = int64_t{p.num_requests} * p.num_kv_heads * splits * row_tiles;
  TORCH_CHECK(grid <= std::numeric_limits<int>::max(), "tree_attention: grid of ", grid, " CTAs is too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t rows = int64_t{p.num_tokens} * p.num_q_heads;
    const int64_t merge_grid = (rows + kMergeWarps - 1) / kMergeWarps;
    merge_splits_kernel<T, Cfg::kHeadDim>
        <<<static_cast<unsigned>(merge_grid), kMergeWarps * 32, 0, stream>>>(p, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int kHeadDim>
void launch_for_head_dim(const TreeAttentionParams<T>& p, int q_max, int64_t max_context,
                         int64_t num_splits, const at::Tensor& like) {
  using Small = typename Configs<kHeadDim>::Small;
  using Large = typename Configs<kHeadDim>::Large;
  if (use_large_tiles<kHeadDim>(max_query_rows(p, q_max), p.num_requests, p.num_kv_heads,
                                sm_count(like.get_device()))) {
    launch_tree_attention<T, Large>(p, q_max, max_context, num_splits, like);
  } else {
    launch_tree_attention<T, Small>(p, q_max, max_context, num_splits, like);
  }
}

// Entry point for one dtype (explicitly instantiated for __nv_bfloat16 and __half).
template <typename T>
void run_tree_attention(const TreeAttentionParams<T>& p, int q_max, int64_t max_context,
                        int64_t num_splits, const at::Tensor& like) {
  if (p.num_tokens == 0 || p.num_requests == 0) return;
  switch (p.head_dim) {
    case 64:
      launch_for_head_dim<T, 64>(p, q_max, max_context, num_splits, like);
      break;
    case 128:
      launch_for_head_dim<T, 128>(p, q_max, max_context, num_splits, like);
      break;
    default:
      TORCH_CHECK(false, "tree_attention (CUDA): head_dim must be 64 or 128, got ", p.head_dim);
  }
}

}  // namespace cuda
}  // namespace medusa_vllm
