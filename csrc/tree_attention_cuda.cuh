// CUDA core of tree_attention: one pass over the paged KV cache with tensor-core MMAs.
//
// Work split. A CTA handles (request b, kv head, query-row tile, KV split). The rows of a
// request's kv head are its q_len tokens x `group` query heads, stacked token-major
// (row r = token r / group, q head kv_head * group + r % group), so each K/V tile is read once
// for the whole GQA group. 4 warps own 16 * kMTiles rows each.
//
// Latency: at small batches a CTA has one warp per SM sub-partition, so nothing hides a stall;
// the block-table entries of a tile are loaded a pipeline step before its copies, the copies'
// addresses are branch-free, a window tile's visibility is one word per row (a shift per
// score), and a row's destination is computed once.
//
// Per KV tile of kBlockN keys (cp.async multi-stage pipeline, zero-filled past seq_len):
//   S = Q K^T            mma.m16n8k16, fp32 accumulators (Q fragments in registers or smem)
//   softcap, log2e scale; tree mask only on tiles that reach the query window
//   online softmax       running max / sum per row in fp32 (log2 domain, ex2.approx)
//   O += P V             P re-packed from the S accumulators into A fragments (no smem trip)
// Split KV (flash-decoding): split s of a request takes a contiguous range of its tiles,
// computed on the device from seq_lens; partial O / log2-sum-exp go to a workspace and
// merge_splits_kernel (tree_attention_cuda_merge.cuh) combines them. With one split the CTA
// writes `out` directly.
#pragma once

#include <cmath>

#include "cuda_utils.cuh"
#include "paged_kv.h"
#include "tree_attention_cuda_merge.cuh"
#include "tree_attention_cuda_tiles.cuh"
#include "tree_attention_cuda_warp.cuh"

// Phase timestamps for latency work (tools/gpu/kernel_trace.py builds with
// MEDUSA_VLLM_KERNEL_TRACE and a header that defines MEDUSA_TRACE); nothing otherwise.
#if defined(MEDUSA_VLLM_KERNEL_TRACE)
#include "kernel_trace.cuh"
#else
#define MEDUSA_TRACE(slot)
#endif

namespace medusa_vllm {
namespace cuda {

// Where CTA rows go: `out` (one split) or the split's fp32 partials and log2-sum-exp. A row's
// destination is computed once (two divisions by the group), then stored to column by column.
template <typename T>
struct RowWriter {
  const TreeAttentionParams<T>& p;
  const SplitKV& sp;
  const CtaWork& w;

  struct Dst {
    T* out;       // one split: the row in `out`
    float* o;     // more splits: the row in partial_o
    float* lse;   //              and its log2-sum-exp
  };
  __device__ __forceinline__ Dst row(int r) const {
    const int gr = w.row0 + r;
    const int token = w.q_start + gr / w.group;
    const int head = w.kv_head * w.group + gr % w.group;
    Dst d{nullptr, nullptr, nullptr};
    if (sp.num_splits == 1) {
      d.out = p.out + static_cast<int64_t>(token) * p.out_stride_token +
              static_cast<int64_t>(head) * p.out_stride_head;
    } else {
      const int64_t index = static_cast<int64_t>(w.split) * p.num_tokens * p.num_q_heads +
                            static_cast<int64_t>(token) * p.num_q_heads + head;
      d.o = sp.partial_o + index * p.head_dim;
      d.lse = sp.partial_lse + index;
    }
    return d;
  }
  __device__ __forceinline__ void store2(const Dst& d, int col, float x, float y) const {
    if (sp.num_splits == 1) *reinterpret_cast<uint32_t*>(d.out + col) = MmaOps<T>::pack(x, y);
    else *reinterpret_cast<float2*>(d.o + col) = make_float2(x, y);
  }
  __device__ __forceinline__ void store_lse(const Dst& d, float lse) const {
    if (sp.num_splits > 1) *d.lse = lse;
  }
};

// Rows of a CTA that cannot compute: invalid metadata (NaN rows, loud and sync-free) or an
// empty split (log2-sum-exp -inf, ignored by the merge).
template <typename T, typename Cfg>
__device__ void fill_rows(const TreeAttentionParams<T>& p, const SplitKV& sp, const CtaWork& w,
                          bool invalid) {
  const RowWriter<T> writer{p, sp, w};
  const int n = min(Cfg::kBlockM, w.rows - w.row0);
  for (int i = threadIdx.x; i < n * (Cfg::kHeadDim / 2); i += Cfg::kThreads) {
    const int r = i / (Cfg::kHeadDim / 2);
    const int d = 2 * (i % (Cfg::kHeadDim / 2));
    const auto dst = writer.row(r);
    if (invalid) writer.store2(dst, d, NAN, NAN);
    if (d == 0) writer.store_lse(dst, invalid ? 0.f : -INFINITY);
  }
}

// Mask words of the CTA rows -> s_mask [kBlockM][kMaxMaskWords] (0 for padding rows).
template <typename T, typename Cfg>
__device__ __forceinline__ void load_mask_rows(const TreeAttentionParams<T>& p, const CtaWork& w,
                                               uint64_t* s_mask) {
  for (int r = threadIdx.x; r < Cfg::kBlockM; r += Cfg::kThreads) {
    const int gr = w.row0 + r;
    static_assert(kMaxMaskWords == 2, "mask rows are loaded as two words");
    uint64_t word0 = 0, word1 = 0;
    if (gr < w.rows) {
      const uint64_t* row = p.masks.row(w.tree, gr / w.group);
      word0 = row[0];
      if (p.masks.words > 1) word1 = row[1];
    }
    s_mask[r * kMaxMaskWords] = word0;
    s_mask[r * kMaxMaskWords + 1] = word1;
  }
}

// Q rows of the CTA -> s_q [kBlockM][kSmemRow] (async; zeros for padding rows).
template <typename T, typename Cfg>
__device__ __forceinline__ void load_q_tile(const TreeAttentionParams<T>& p, const CtaWork& w, T* s_q) {
  const int chunk = threadIdx.x % Cfg::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < Cfg::kBlockM / Cfg::kRowsPerPass; ++i) {
    const int r = threadIdx.x / Cfg::kChunksPerRow + i * Cfg::kRowsPerPass;
    const int gr = w.row0 + r;
    const bool valid = gr < w.rows;
    const T* src = p.q;
    if (valid) {
      src += static_cast<int64_t>(w.q_start + gr / w.group) * p.q_stride_token +
             static_cast<int64_t>(w.kv_head * w.group + gr % w.group) * p.q_stride_head +
             chunk * Cfg::kChunk;
    }
    cp_async_16(s_q + r * Cfg::kSmemRow + chunk * Cfg::kChunk, src, valid);
  }
}

// Physical blocks of this thread's keys of KV tile `tile` (0 past seq_len: not loaded, not
// read). The block-table loads are issued a pipeline step before the copies that use them, so
// their latency stays off the per-tile path. kPow2: the block size is 1 << sp.block_shift (a
// launch-uniform branch picks the variant, so the per-key code has no branch).
template <bool kPow2, typename T, typename Cfg>
__device__ __forceinline__ void load_tile_blocks_as(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                                    const CtaWork& w, int tile,
                                                    int (&blocks)[Cfg::kKeysPerThread]) {
  const int32_t* table = p.kv.block_table + w.request * p.kv.block_table_stride;
#pragma unroll
  for (int i = 0; i < Cfg::kKeysPerThread; ++i) {
    const int pos = tile * Cfg::kBlockN + threadIdx.x / Cfg::kChunksPerRow + i * Cfg::kRowsPerPass;
    const int page = kPow2 ? pos >> sp.block_shift : pos / p.kv.block_size;
    blocks[i] = pos < w.seq_len ? __ldg(table + page) : 0;
  }
}

template <typename T, typename Cfg>
__device__ __forceinline__ void load_tile_blocks(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                                 const CtaWork& w, int tile,
                                                 int (&blocks)[Cfg::kKeysPerThread]) {
  if (sp.block_shift >= 0) load_tile_blocks_as<true, T, Cfg>(p, sp, w, tile, blocks);
  else load_tile_blocks_as<false, T, Cfg>(p, sp, w, tile, blocks);
}

// Keys [tile * kBlockN, +kBlockN) of K and V -> one pipeline stage (async; zeros past seq_len),
// from the blocks load_tile_blocks read for the same tile. Branch-free per key: a key past
// seq_len copies nothing from its (block 0) address and zero-fills.
template <bool kPow2, typename T, typename Cfg>
__device__ __forceinline__ void load_kv_tile_as(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                                const CtaWork& w, int tile,
                                                const int (&blocks)[Cfg::kKeysPerThread], T* s_k, T* s_v) {
  const PagedKV<const T>& kv = p.kv;
  const int chunk = threadIdx.x % Cfg::kChunksPerRow;
  const T* k_head = kv.k + w.kv_head * kv.k_stride_head + chunk * Cfg::kChunk;
  const T* v_head = kv.v + w.kv_head * kv.v_stride_head + chunk * Cfg::kChunk;
#pragma unroll
  for (int i = 0; i < Cfg::kKeysPerThread; ++i) {
    const int key = threadIdx.x / Cfg::kChunksPerRow + i * Cfg::kRowsPerPass;
    const int pos = tile * Cfg::kBlockN + key;
    const int offset = kPow2 ? pos & (kv.block_size - 1) : pos % kv.block_size;
    const int64_t block = blocks[i];
    const bool valid = pos < w.seq_len;
    cp_async_16(s_k + key * Cfg::kSmemRow + chunk * Cfg::kChunk,
                k_head + block * kv.k_stride_block + offset * kv.k_stride_token, valid);
    cp_async_16(s_v + key * Cfg::kSmemRow + chunk * Cfg::kChunk,
                v_head + block * kv.v_stride_block + offset * kv.v_stride_token, valid);
  }
}

template <typename T, typename Cfg>
__device__ __forceinline__ void load_kv_tile(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                             const CtaWork& w, int tile,
                                             const int (&blocks)[Cfg::kKeysPerThread], T* s_k, T* s_v) {
  if (sp.block_shift >= 0) load_kv_tile_as<true, T, Cfg>(p, sp, w, tile, blocks, s_k, s_v);
  else load_kv_tile_as<false, T, Cfg>(p, sp, w, tile, blocks, s_k, s_v);
}

// Normalizes and stores the warp's rows (or the split partials and their log2-sum-exp).
template <typename T, typename Cfg>
__device__ __forceinline__ void store_warp_rows(const RowWriter<T>& writer,
                                                float (&o)[Cfg::kMTiles][Cfg::kDTiles][4],
                                                const float (&m_run)[Cfg::kMTiles][2],
                                                float (&l_run)[Cfg::kMTiles][2], int warp_row0,
                                                int lane) {
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mi][h];
      l += __shfl_xor_sync(kFullWarp, l, 1);
      l += __shfl_xor_sync(kFullWarp, l, 2);
      const int r = warp_row0 + mi * 16 + (lane >> 2) + h * 8;
      if (writer.w.row0 + r >= writer.w.rows) continue;
      const auto dst = writer.row(r);
      const float inv_l = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gets zeros
#pragma unroll
      for (int dt = 0; dt < Cfg::kDTiles; ++dt)
        writer.store2(dst, dt * 8 + (lane & 3) * 2, o[mi][dt][2 * h] * inv_l, o[mi][dt][2 * h + 1] * inv_l);
      if ((lane & 3) == 0) writer.store_lse(dst, l > 0.f ? m_run[mi][h] + __log2f(l) : -INFINITY);
    }
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Decodes blockIdx.x = ((request * Hkv + kv_head) * num_splits + split) * row_tiles + row_tile
// (row tiles innermost: CTAs sharing a K/V range run together and share it through L2).
template <typename T, typename Cfg>
__device__ __forceinline__ CtaWork decode_cta(const TreeAttentionParams<T>& p, const SplitKV& sp) {
  CtaWork w;
  const int row_tile = blockIdx.x % sp.row_tiles;
  w.split = (blockIdx.x / sp.row_tiles) % sp.num_splits;
  const int head_index = blockIdx.x / (sp.row_tiles * sp.num_splits);
  w.request = head_index / p.num_kv_heads;
  w.kv_head = head_index % p.num_kv_heads;
  w.group = p.num_q_heads / p.num_kv_heads;
  w.q_start = p.query_start_loc[w.request];
  w.q_len = p.query_start_loc[w.request + 1] - w.q_start;
  w.rows = w.q_len * w.group;
  w.row0 = row_tile * Cfg::kBlockM;
  w.seq_len = p.seq_lens[w.request];
  w.ctx = w.seq_len - w.q_len;
  w.tree = p.req_tree_ids[w.request];
  const int num_tiles = ceil_div(max(w.seq_len, 0), Cfg::kBlockN);
  const int per_split = max(ceil_div(num_tiles, sp.num_splits), sp.min_tiles_per_split);
  w.tile_begin = w.split * per_split;
  w.tile_end = min(num_tiles, w.tile_begin + per_split);
  return w;
}

// The CTA's rows over its KV tiles: the pipeline, the warps' math, the stores.
template <typename T, typename Cfg>
__device__ __forceinline__ void attend_rows(const TreeAttentionParams<T>& p, const SplitKV& sp,
                                            const CtaWork& w) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* s_mask = reinterpret_cast<uint64_t*>(smem);             // [kBlockM][kMaxMaskWords]
  T* s_q = reinterpret_cast<T*>(smem + Cfg::kMaskBytes);             // [kBlockM][kSmemRow]
  T* s_k = reinterpret_cast<T*>(smem + Cfg::kMaskBytes + Cfg::kQBytes);  // [kStages][kBlockN][kSmemRow]
  T* s_v = s_k + Cfg::kStages * Cfg::kBlockN * Cfg::kSmemRow;           // [kStages][kBlockN][kSmemRow]
  constexpr int kStageElems = Cfg::kBlockN * Cfg::kSmemRow;

  const int lane = threadIdx.x % 32;
  const int warp_row0 = (threadIdx.x / 32) * Cfg::kWarpRows;  // first row of this warp in the CTA
  const bool warp_active = w.row0 + warp_row0 < w.rows;

  // Prologue: Q and the first kStages - 1 KV tiles (async groups; Q rides in group 0 with the
  // first tile), then the mask rows (plain loads and stores, in the shadow of the copies; read
  // after the loop's first barrier).
  int blocks[Cfg::kStages][Cfg::kKeysPerThread];  // block-table entries: the prologue's tiles, then the next one
#pragma unroll
  for (int st = 0; st < Cfg::kStages; ++st)
    if (w.tile_begin + st < w.tile_end) load_tile_blocks<T, Cfg>(p, sp, w, w.tile_begin + st, blocks[st]);
  load_q_tile<T, Cfg>(p, w, s_q);
#pragma unroll
  for (int st = 0; st < Cfg::kStages - 1; ++st) {
    if (w.tile_begin + st < w.tile_end)
      load_kv_tile<T, Cfg>(p, sp, w, w.tile_begin + st, blocks[st], s_k + st * kStageElems,
                           s_v + st * kStageElems);
    cp_async_commit();
  }
  int (&next_blocks)[Cfg::kKeysPerThread] = blocks[Cfg::kStages - 1];  // tile j + kStages - 1's
  MEDUSA_TRACE(2);
  load_mask_rows<T, Cfg>(p, w, s_mask);
  MEDUSA_TRACE(3);

  float o[Cfg::kMTiles][Cfg::kDTiles][4];
  float m_run[Cfg::kMTiles][2];
  float l_run[Cfg::kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi) {
#pragma unroll
    for (int dt = 0; dt < Cfg::kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_run[mi][h] = -INFINITY;
      l_run[mi][h] = 0.f;
    }
  }
  uint32_t q_frag[Cfg::kQInRegs ? Cfg::kMTiles : 1][Cfg::kQInRegs ? Cfg::kKSteps : 1][4];

  for (int tile = w.tile_begin; tile < w.tile_end; ++tile) {
    const int j = tile - w.tile_begin;
    cp_async_wait<Cfg::kStages - 2>();  // this thread's copies of tile j (and Q) landed
    MEDUSA_TRACE(4 + 3 * min(j, 7));
    __syncthreads();                    // everyone's did; everyone is done with tile j - 1
    MEDUSA_TRACE(5 + 3 * min(j, 7));
    const int next = tile + Cfg::kStages - 1;
    if (next < w.tile_end) {
      const int st = (j + Cfg::kStages - 1) % Cfg::kStages;  // the stage of tile j - 1
      load_kv_tile<T, Cfg>(p, sp, w, next, next_blocks, s_k + st * kStageElems, s_v + st * kStageElems);
      if (next + 1 < w.tile_end) load_tile_blocks<T, Cfg>(p, sp, w, next + 1, next_blocks);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform
    if (!warp_active) continue;

    if constexpr (Cfg::kQInRegs) {
      if (j == 0) {
#pragma unroll
        for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
          for (int kk = 0; kk < Cfg::kKSteps; ++kk) load_q_frag<Cfg>(q_frag[mi][kk], s_q, warp_row0, mi, kk, lane);
      }
    }
    const int st = j % Cfg::kStages;
    float s[Cfg::kMTiles][Cfg::kNTiles][4];
    warp_scores<T, Cfg>(s, q_frag, s_q, s_k + st * kStageElems, warp_row0, lane);
    scale_and_mask<T, Cfg>(s, p, w, tile, s_mask, warp_row0, lane);
    online_softmax<Cfg>(s, o, m_run, l_run);
    warp_pv<T, Cfg>(o, s, s_v + st * kStageElems, lane);
    MEDUSA_TRACE(6 + 3 * min(j, 7));
  }

  if (warp_active) {
    const RowWriter<T> writer{p, sp, w};
    store_warp_rows<T, Cfg>(writer, o, m_run, l_run, warp_row0, lane);
  }
  MEDUSA_TRACE(28);
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    tree_attention_kernel(const __grid_constant__ TreeAttentionParams<T> p,
                          const __grid_constant__ SplitKV sp) {
  MEDUSA_TRACE(0);
  const CtaWork w = decode_cta<T, Cfg>(p, sp);
  MEDUSA_TRACE(1);
  if (w.q_len <= 0 || w.row0 >= w.rows) return;  // padded request or unused row tile
  const bool invalid = w.q_len > p.masks.q_max || w.ctx < 0 || w.tree < 0 || w.tree >= p.masks.num_trees;
  if (invalid || w.tile_begin >= w.tile_end) fill_rows<T, Cfg>(p, sp, w, invalid);
  else attend_rows<T, Cfg>(p, sp, w);
}

}  // namespace cuda
}  // namespace medusa_vllm
