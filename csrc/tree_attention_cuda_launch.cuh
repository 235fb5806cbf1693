// Host-side launch of the tree_attention CUDA kernels: tile-config choice, split-KV choice,
// workspace, launch. Instantiated per dtype in tree_attention_cuda_{bf16,fp16}.cu.
//
// CUDA-graph safety: the grid and the workspace size depend only on host ints (N, B, Hkv,
// Q_MAX, num_splits, block_table width, SM count); per-request KV ranges are computed on the
// device from seq_lens.
//
// A/B knob: how the split-KV partials are merged (only at small batches, where the grid has
// fewer CTAs than SMs and splits > 1), read once per process from MEDUSA_VLLM_SPLIT_MERGE:
//   launch (default)  merge_splits_kernel, a second plain launch;
//   pdl               the same kernel with Programmatic Dependent Launch: its CTAs start while
//                     the attention kernel runs and wait (griddepcontrol.wait) for its end; a
//                     separate plain launch where the merge kernel's binary is not sm_90+ code;
//   fused             no second launch: each (request, kv head, row tile) group's last CTA
//                     merges (tree_attention_cuda_merge.cuh); a separate launch past
//                     kMaxMergeGroups groups, or (with a warning) where the fused kernel fits
//                     fewer CTAs per SM than the plain one. One fused launch at a time per
//                     device.
// Every mode gives the same bits, and the split count does not depend on the mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

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

// CTAs per SM of the attention kernel (the split count comes from the plain one's: the same in
// every merge mode). The shared-memory attribute is set first (the tile needs > 48 KiB).
template <typename T, typename Cfg, bool kFusedMerge = false>
int blocks_per_sm() {
  static const int n = [] {
    auto kernel = tree_attention_kernel<T, Cfg, kFusedMerge>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, Cfg::kThreads, Cfg::kSmemBytes));
    return std::max(blocks, 1);
  }();
  return n;
}

// Whether a fused-merge launch of `groups` groups is possible and as fast to fill the GPU as the
// plain kernel (its merge must not cost a CTA per SM: the split count assumes the plain one's).
template <typename T, typename Cfg>
bool use_fused_merge(int64_t groups) {
  if (groups > kMaxMergeGroups) return false;
  if (blocks_per_sm<T, Cfg, true>() < blocks_per_sm<T, Cfg, false>()) {
    TORCH_WARN_ONCE("MEDUSA_VLLM_SPLIT_MERGE=fused: the fused kernel fits fewer CTAs per SM than the "
                    "plain one; merging with a separate launch");
    return false;
  }
  return true;
}

enum class SplitMerge { kLaunch, kPdl, kFused };

// MEDUSA_VLLM_SPLIT_MERGE (see the top of this file), read once.
inline SplitMerge split_merge_mode() {
  static const SplitMerge mode = [] {
    const char* env = std::getenv("MEDUSA_VLLM_SPLIT_MERGE");
    const std::string name = env ? env : "";
    if (name.empty() || name == "launch") return SplitMerge::kLaunch;
    if (name == "pdl") return SplitMerge::kPdl;
    TORCH_CHECK(name == "fused", "MEDUSA_VLLM_SPLIT_MERGE must be launch, pdl or fused, got '", name, "'");
    return SplitMerge::kFused;
  }();
  return mode;
}

// Whether merge_splits_kernel's binary on this device was compiled for sm_90+ (with
// griddepcontrol.wait): a PDL launch of code without the wait would race the attention kernel
// (say compute_80 PTX JIT-compiled for a newer GPU).
template <typename T, int kHeadDim>
bool merge_kernel_waits_for_grid() {
  static const bool waits = [] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, merge_splits_kernel<T, kHeadDim>));
    return attr.ptxVersion >= 90;
  }();
  return waits;
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

// merge_splits_kernel after the attention kernel on `stream`: a plain launch, or with PDL.
template <typename T, int kHeadDim>
void launch_merge(const TreeAttentionParams<T>& p, const SplitKV& sp, bool pdl, cudaStream_t stream) {
  const int64_t rows = int64_t{p.num_tokens} * p.num_q_heads;
  const auto grid = static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps);
  if (pdl && !merge_kernel_waits_for_grid<T, kHeadDim>()) {
    TORCH_WARN_ONCE("MEDUSA_VLLM_SPLIT_MERGE=pdl: the merge kernel's binary is not sm_90+ code; "
                    "launching it without PDL");
    pdl = false;
  }
  if (!pdl) {
    merge_splits_kernel<T, kHeadDim><<<grid, kMergeWarps * 32, 0, stream>>>(p, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kMergeWarps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, merge_splits_kernel<T, kHeadDim>, p, sp));
}

template <typename T, typename Cfg>
void launch_tree_attention(const TreeAttentionParams<T>& p, int q_max, int64_t max_context,
                           int64_t num_splits, const at::Tensor& like) {
  const int device = like.get_device();
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
  const SplitMerge mode = split_merge_mode();
  const int64_t groups = int64_t{p.num_requests} * p.num_kv_heads * row_tiles;
  const bool fused = splits > 1 && mode == SplitMerge::kFused && use_fused_merge<T, Cfg>(groups);
  auto kernel = fused ? tree_attention_kernel<T, Cfg, true> : tree_attention_kernel<T, Cfg, false>;
  // The tile needs > 48 KiB of shared memory (an attribute per device: set on every call).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1 && !fused) launch_merge<T, Cfg::kHeadDim>(p, sp, mode == SplitMerge::kPdl, stream);
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
