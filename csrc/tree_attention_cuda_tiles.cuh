// Tile configurations and launch geometry of the tree_attention CUDA kernel (host and device):
// TileConfig (per-CTA tile sizes, shared-memory budget), the Small/Large config per head dim,
// SplitKV (split-KV launch parameters) and CtaWork (what one CTA computes).
#pragma once

#include "paged_kv.h"

namespace medusa_vllm {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxSplits = 128;  // KV splits per launch at most (the merge reads kMaxSplits / 32 per lane)

// Split-KV launch parameters (host-known except the partial contents).
struct SplitKV {
  int num_splits;           // KV splits per (request, kv head, row tile)
  int row_tiles;            // query-row tiles per (request, kv head)
  int min_tiles_per_split;  // keeps short contexts from being over-split
  int block_shift;          // log2(block_size) if a power of two, else -1
  float* partial_o;         // [num_splits, N, Hq, D] (num_splits > 1)
  float* partial_lse;       // [num_splits, N, Hq] log2-sum-exp (num_splits > 1)
};

template <int kHeadDim_, int kMTiles_, int kBlockN_, int kStages_>
struct TileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kMTiles_;  // 16-row MMA tiles per warp
  static constexpr int kBlockN = kBlockN_;  // keys per KV tile
  static constexpr int kStages = kStages_;  // cp.async pipeline depth (KV tiles in flight + 1)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;  // query rows per CTA
  static constexpr int kChunk = 8;                    // 2-byte elements per 16-byte copy
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows one copy sweep covers
  static constexpr int kKeysPerThread = kBlockN / kRowsPerPass;  // keys of a KV tile one thread copies
  // Shared-memory rows are padded by 16 bytes so the 8 row addresses of an ldmatrix hit
  // distinct bank groups.
  static constexpr int kSmemRow = kHeadDim + kChunk;
  static constexpr int kKSteps = kHeadDim / 16;  // k-steps of S = Q K^T
  static constexpr int kNTiles = kBlockN / 8;    // 8-key n-tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // 8-wide n-tiles of O
  static constexpr bool kQInRegs = kMTiles * kHeadDim <= 128;  // else re-read Q from smem
  static constexpr int kMaskBytes = kBlockM * kMaxMaskWords * 8;
  static constexpr int kQBytes = kBlockM * kSmemRow * 2;
  static constexpr int kKVStageBytes = kBlockN * kSmemRow * 2;  // one K (or V) stage
  static constexpr int kSmemBytes = kMaskBytes + kQBytes + 2 * kStages * kKVStageBytes;

  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "MMA tiles are 16 wide");
  static_assert(kThreads % kChunksPerRow == 0 && kBlockN % kRowsPerPass == 0 &&
                    kBlockM % kRowsPerPass == 0,
                "a copy sweep must tile the Q and KV tiles exactly");
  static_assert(kStages >= 2, "need at least double buffering");
};

// Tile configurations per head dim: Small for <= 64 query rows per (request, kv head),
// Large (32 rows per warp: half the shared-memory traffic per MMA) for bigger trees x groups.
//                                      head dim, m-tiles/warp, keys/tile, stages
template <int kHeadDim>
struct Configs;
template <>
struct Configs<64> {
  using Small = TileConfig<64, 1, 64, 3>;
  using Large = TileConfig<64, 2, 64, 3>;
};
template <>
struct Configs<128> {
  using Small = TileConfig<128, 1, 64, 2>;
  using Large = TileConfig<128, 2, 32, 3>;  // 32-key tiles keep O + S within the register file
};

// One 64-key tile per split at least. Small batches give the grid a handful of CTAs, each
// walking its keys tile after tile: in vLLM on the H100 (batch 1, ~170 keys, 64-node tree,
// 9 q / 3 kv heads) a 256-key minimum put every key in one split, 27 us per layer call.
constexpr int kMinKeysPerSplit = 64;

// Query rows per (request, kv head) the grid must cover: Q_MAX (or N) tokens x group.
template <typename T>
inline int max_query_rows(const TreeAttentionParams<T>& p, int q_max) {
  return (q_max < p.num_tokens ? q_max : p.num_tokens) * (p.num_q_heads / p.num_kv_heads);
}

// Large tiles (half the shared-memory traffic per MMA) when a tile row count over 64 would
// still give every SM a CTA; otherwise Small: more, shorter CTAs for the latency-bound case.
template <int kHeadDim>
inline bool use_large_tiles(int max_rows, int64_t num_requests, int num_kv_heads, int sms) {
  using Small = typename Configs<kHeadDim>::Small;
  using Large = typename Configs<kHeadDim>::Large;
  if (max_rows <= Small::kBlockM) return false;
  const int64_t ctas = num_requests * num_kv_heads * ((max_rows + Large::kBlockM - 1) / Large::kBlockM);
  return ctas >= sms;
}

// Grid-shape parameters of a launch with `num_splits` splits (workspace pointers left null).
template <typename Cfg, typename T>
inline SplitKV make_split_kv(const TreeAttentionParams<T>& p, int q_max, int num_splits) {
  const int block_size = p.kv.block_size;
  SplitKV sp{};
  sp.num_splits = num_splits;
  sp.row_tiles = (max_query_rows(p, q_max) + Cfg::kBlockM - 1) / Cfg::kBlockM;
  sp.min_tiles_per_split = kMinKeysPerSplit / Cfg::kBlockN > 1 ? kMinKeysPerSplit / Cfg::kBlockN : 1;
  sp.block_shift = -1;
  if ((block_size & (block_size - 1)) == 0) {
    sp.block_shift = 0;
    while ((1 << sp.block_shift) < block_size) ++sp.block_shift;
  }
  return sp;
}

// What one CTA computes.
struct CtaWork {
  int request, kv_head, split, group;
  int row0, rows;         // first CTA row; rows of the (request, kv head)
  int q_start, q_len;     // query tokens [q_start, q_start + q_len)
  int seq_len, ctx;       // keys; context keys before the window
  int tree;
  int tile_begin, tile_end;  // KV tiles of this split
};

}  // namespace cuda
}  // namespace medusa_vllm
