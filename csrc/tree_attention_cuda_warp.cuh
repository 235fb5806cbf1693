// Warp-level math of the tree_attention CUDA kernel: each warp owns 16 * kMTiles query rows and
// runs, per KV tile in shared memory, S = Q K^T, scale / softcap / tree mask, the online softmax
// and O += P V on mma.m16n8k16 fragments (layouts: see cuda_utils.cuh).
#pragma once

#include <cmath>

#include "cuda_utils.cuh"
#include "paged_kv.h"
#include "tree_attention_cuda_tiles.cuh"

namespace medusa_vllm {
namespace cuda {

// A fragments of Q for m-tile mi, k-step kk of this warp, from s_q.
template <typename Cfg, typename T>
__device__ __forceinline__ void load_q_frag(uint32_t (&a)[4], const T* s_q, int warp_row0, int mi,
                                            int kk, int lane) {
  ldmatrix_x4(a, s_q + (warp_row0 + mi * 16 + (lane & 15)) * Cfg::kSmemRow + kk * 16 + (lane >> 4) * 8);
}

// s = Q K^T for the warp's rows and the kBlockN keys of the stage.
template <typename T, typename Cfg, typename QFrags>
__device__ __forceinline__ void warp_scores(float (&s)[Cfg::kMTiles][Cfg::kNTiles][4],
                                            const QFrags& q_frag, const T* s_q, const T* s_k,
                                            int warp_row0, int lane) {
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::kNTiles; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][ni][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
    uint32_t a[Cfg::kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kMTiles; ++mi) {
      if constexpr (Cfg::kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mi][i] = q_frag[mi][kk][i];
      } else {
        load_q_frag<Cfg>(a[mi], s_q, warp_row0, mi, kk, lane);
      }
    }
#pragma unroll
    for (int nj = 0; nj < Cfg::kNTiles / 2; ++nj) {  // two 8-key n-tiles per ldmatrix.x4
      uint32_t b[4];
      ldmatrix_x4(b, s_k + (nj * 16 + (lane & 7) + (lane >> 4) * 8) * Cfg::kSmemRow + kk * 16 +
                         ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mi = 0; mi < Cfg::kMTiles; ++mi) {
        MmaOps<T>::mma(s[mi][2 * nj], a[mi], b[0], b[1]);
        MmaOps<T>::mma(s[mi][2 * nj + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// Logits -> log2 domain with scale (and softcap); -inf where the tree mask hides the key.
template <typename T, typename Cfg>
__device__ __forceinline__ void scale_and_mask(float (&s)[Cfg::kMTiles][Cfg::kNTiles][4],
                                               const TreeAttentionParams<T>& p, const CtaWork& w,
                                               int tile, const uint64_t* s_mask, int warp_row0,
                                               int lane) {
  if (p.softcap > 0.f) {  // launch-uniform: one branch per tile, not one per score
#pragma unroll
    for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::kNTiles; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[mi][ni][e] = p.softcap * kLog2e * tanhf(s[mi][ni][e] * (p.scale / p.softcap));
  } else {
    const float scale = p.scale * kLog2e;
#pragma unroll
    for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::kNTiles; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][ni][e] *= scale;
  }
  const int tile_key0 = tile * Cfg::kBlockN;
  if (tile_key0 + Cfg::kBlockN <= w.ctx) return;  // pure context tile: everything visible
  // Per row of this lane (g and g + 8 of each m-tile): which of the tile's keys it sees, as one
  // word (bit k: key tile_key0 + k), built once per tile from the row's 128 mask bits; the
  // per-score test is then a constant shift. Keys before the window are context (seen), keys
  // from seq_len on are not.
  static_assert(kMaxMaskWords == 2 && kMaskWordBits == 64 && Cfg::kBlockN <= 64,
                "a tile's keys fit one word; a row's mask is two");
  const int o = tile_key0 - w.ctx;              // window index of the tile's first key, > -kBlockN
  const int keys_in_seq = w.seq_len - tile_key0;  // >= 1
  const uint64_t in_seq = keys_in_seq >= 64 ? ~0ull : (1ull << keys_in_seq) - 1;
  uint64_t seen[Cfg::kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint64_t* row = s_mask + (warp_row0 + mi * 16 + (lane >> 2) + h * 8) * kMaxMaskWords;
      const uint64_t w0 = row[0], w1 = row[1];
      uint64_t bits;
      if (o < 0) bits = (w0 << -o) | ((1ull << -o) - 1);  // -o context keys first
      else if (o == 0) bits = w0;
      else if (o < 64) bits = (w0 >> o) | (w1 << (64 - o));
      else bits = w1 >> (o - 64);
      seen[mi][h] = (bits & in_seq) >> ((lane & 3) * 2);  // bit 0: this lane's first key column
    }
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::kNTiles; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (!((seen[mi][e >> 1] >> (ni * 8 + (e & 1))) & 1u)) s[mi][ni][e] = -INFINITY;
}

// Online softmax: turns s into probabilities relative to the running max, rescales o / l.
template <typename Cfg>
__device__ __forceinline__ void online_softmax(float (&s)[Cfg::kMTiles][Cfg::kNTiles][4],
                                               float (&o)[Cfg::kMTiles][Cfg::kDTiles][4],
                                               float (&m_run)[Cfg::kMTiles][2],
                                               float (&l_run)[Cfg::kMTiles][2]) {
#pragma unroll
  for (int mi = 0; mi < Cfg::kMTiles; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row g, h = 1: row g + 8
      float tile_max = -INFINITY;
#pragma unroll
      for (int ni = 0; ni < Cfg::kNTiles; ++ni)
        tile_max = fmaxf(tile_max, fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]));
      // The 4 lanes of a quad hold the same row.
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 2));
      const float m_new = fmaxf(m_run[mi][h], tile_max);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: avoid inf - inf
      const float alpha = fast_exp2(m_run[mi][h] - base);
      m_run[mi][h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < Cfg::kNTiles; ++ni)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[mi][ni][e] = fast_exp2(s[mi][ni][e] - base);
          sum += s[mi][ni][e];
        }
      l_run[mi][h] = l_run[mi][h] * alpha + sum;  // per-lane partial; quad-reduced at the end
#pragma unroll
      for (int dt = 0; dt < Cfg::kDTiles; ++dt) {
        o[mi][dt][2 * h] *= alpha;
        o[mi][dt][2 * h + 1] *= alpha;
      }
    }
}

// o += P V with P taken from the S accumulators (C layout of two n-tiles == A layout).
template <typename T, typename Cfg>
__device__ __forceinline__ void warp_pv(float (&o)[Cfg::kMTiles][Cfg::kDTiles][4],
                                        const float (&s)[Cfg::kMTiles][Cfg::kNTiles][4],
                                        const T* s_v, int lane) {
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
    uint32_t a[Cfg::kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kMTiles; ++mi) {
      a[mi][0] = MmaOps<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      a[mi][1] = MmaOps<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      a[mi][2] = MmaOps<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      a[mi][3] = MmaOps<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dj = 0; dj < Cfg::kDTiles / 2; ++dj) {  // two 8-wide d-tiles per ldmatrix.x4.trans
      uint32_t b[4];
      ldmatrix_x4_trans(b, s_v + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Cfg::kSmemRow +
                               dj * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mi = 0; mi < Cfg::kMTiles; ++mi) {
        MmaOps<T>::mma(o[mi][2 * dj], a[mi], b[0], b[1]);
        MmaOps<T>::mma(o[mi][2 * dj + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace medusa_vllm
