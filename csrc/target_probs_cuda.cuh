// The target_probs kernel (host function in target_probs_cuda.cu): one 1024-thread block per
// row; the passes of target_probs.h, each a sweep over the row (L2-resident), no sort, no host
// sync. Pure CUDA (no ATen), so tests/kernels/cuda_emulation runs it on a CPU.
//
// Histograms: a thread takes 8 consecutive tokens a sweep and adds runs of one byte value at
// once (a row's keys share a few top-byte values: one bin per power of two of |x|); warps spread
// over 4 sub-histograms; 32-bit shared atomics (add_weight). Integer sums: the result does not
// depend on the atomics' order. Float sums (the kept mass) are fixed-order trees. The tokens
// tied at the boundary are ranked by id with a block scan over the same 8-token layout.
#pragma once

#include <cmath>
#include <cstdint>

#include "block_ops.cuh"
#include "target_probs.h"

namespace medusa_vllm {
namespace cuda {

constexpr int kPerThread = 8;  // consecutive tokens a thread takes per sweep step
constexpr int kSubHists = 4;

struct Shared {
  unsigned hist_lo[kSubHists][256];  // a bin's weight: hi * 2^32 + lo (add_weight)
  unsigned hist_hi[kSubHists][256];
  float fred[kWarps];
  unsigned long long ured[kWarps];
  unsigned scan[kWarps];
  unsigned long long above;
  unsigned long long at;
  uint32_t prefix;
};

template <typename T>
struct Row {
  const T* logits;
  int64_t vocab;
  float temperature;
  __device__ __forceinline__ float x(int64_t i) const { return static_cast<float>(logits[i]) / temperature; }
};

// A 64-bit weight added to a bin as two 32-bit shared atomics, the low half's wrap-around carried
// into the high half (exact: each add wraps at most once). A 64-bit shared atomicAdd is a
// compare-and-swap loop, slow when a row's tokens pile into a few bins (code 084ea7f: about
// 240 µs a row on an H100 whatever the number of rows).
__device__ __forceinline__ void add_weight(unsigned* lo, unsigned* hi, unsigned long long w) {
  const unsigned l = static_cast<unsigned>(w);
  unsigned h = static_cast<unsigned>(w >> 32);
  if (l != 0) {
    const unsigned old = atomicAdd(lo, l);
    h += (old + l < old) ? 1u : 0u;
  }
  if (h != 0) atomicAdd(hi, h);
}

// hist[byte] = weight of the tokens whose key matches prefix under mask, by the byte at shift.
template <typename T, typename Weight>
__device__ void hist_pass(const Row<T>& row, Shared& sh, uint32_t prefix, uint32_t mask, int shift, Weight weight) {
  for (int j = threadIdx.x; j < kSubHists * 256; j += kThreads) {
    (&sh.hist_lo[0][0])[j] = 0;
    (&sh.hist_hi[0][0])[j] = 0;
  }
  __syncthreads();
  unsigned* lo = sh.hist_lo[(threadIdx.x / 32) % kSubHists];
  unsigned* hi = sh.hist_hi[(threadIdx.x / 32) % kSubHists];
  for (int64_t base = int64_t{threadIdx.x} * kPerThread; base < row.vocab; base += int64_t{kThreads} * kPerThread) {
    const int64_t end = base + kPerThread < row.vocab ? base + kPerThread : row.vocab;
    int run_byte = 0;
    unsigned long long run = 0;
    for (int64_t i = base; i < end; ++i) {
      const float x = row.x(i);
      const uint32_t key = order_key(x);
      if ((key & mask) != prefix) continue;
      const unsigned long long w = weight(x, key);
      if (w == 0) continue;
      const int byte = static_cast<int>((key >> shift) & 0xFFu);
      if (run != 0 && byte != run_byte) {
        add_weight(&lo[run_byte], &hi[run_byte], run);
        run = 0;
      }
      run_byte = byte;
      run += w;
    }
    if (run != 0) add_weight(&lo[run_byte], &hi[run_byte], run);
  }
  __syncthreads();
}

// select_byte (target_probs.h) over the summed sub-histograms, by warp 0: lane l takes the
// bytes 255 - 8l down to 248 - 8l, a warp scan finds the lane where the target is reached.
// `less` is taken off the bin of byte `less_byte` first (-1: none).
__device__ inline void select_pass(Shared& sh, unsigned long long target, int shift, int less_byte,
                            unsigned long long less) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned long long bins[8];
    unsigned long long s = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int d = 255 - 8 * lane - j;
      unsigned long long h = 0;
      for (int sub = 0; sub < kSubHists; ++sub)
        h += (static_cast<unsigned long long>(sh.hist_hi[sub][d]) << 32) + sh.hist_lo[sub][d];
      if (d == less_byte) h -= less;
      bins[j] = h;
      s += h;
    }
    unsigned long long incl = s;
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned long long v = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += v;
    }
    const unsigned long long above = sh.above;
    const unsigned reach = __ballot_sync(kFull, above + incl >= target);
    const int first = reach ? __ffs(reach) - 1 : 31;
    if (lane == first) {
      unsigned long long cum = above + incl - s, at = bins[7];
      int pick = 7;  // (nothing reaches: byte 0 with everything above, not met with target <= total)
      bool found = false;
#pragma unroll
      for (int j = 0; j < 8; ++j) {  // unrolled: bins stays in registers
        if (found) continue;
        if (cum + bins[j] >= target) {
          found = true;
          pick = j;
          at = bins[j];
        } else {
          cum += bins[j];
        }
      }
      sh.above = cum;
      sh.at = at;
      sh.prefix |= static_cast<uint32_t>(255 - 8 * lane - pick) << shift;
    }
  }
  __syncthreads();
}

// The radix select of target_probs.h (4 byte passes); `less` is taken off the weight of the
// tokens with key `less_key` (the top-k ties that top-k drops, when top-p selects).
template <typename T, typename Weight>
__device__ Selected radix_select(const Row<T>& row, Shared& sh, unsigned long long target, Weight weight,
                                 uint32_t less_key = 0, unsigned long long less = 0) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above = 0;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t prefix = sh.prefix;
    hist_pass(row, sh, prefix, mask, shift, weight);
    const bool in = less != 0 && (less_key & mask) == prefix;
    select_pass(sh, target, shift, in ? static_cast<int>((less_key >> shift) & 0xFFu) : -1, less);
    mask |= 0xFFu << shift;
  }
  const Selected out{sh.prefix, sh.above, sh.at};
  __syncthreads();  // everyone has it before a next select resets it
  return out;
}

// A row's filters (target_probs.h), every thread taking part: the max of x, the boundary of the
// kept tokens (keys above b.key, and the first b.keep by id at it; ~0: every token) and their
// mass z (a fixed-order float sum). empty: every logit -inf (nothing to sample).
struct RowFilter {
  float m;
  float mp;  // min-p (0: off)
  Boundary b;
  float z;
  bool empty;
  // e = exp(x - m), or 0 where min-p drops the token
  __device__ __forceinline__ float min_p_e(float x) const {
    const float e = expf(x - m);
    return (mp > 0.f && e < mp) ? 0.f : e;
  }
};

template <typename T>
__device__ RowFilter filter_row(const Row<T>& row, Shared& sh, int64_t k, float p, float mp, float mass_scale) {
  const int64_t vocab = row.vocab;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) m = fmaxf(m, row.x(i));
  m = block_reduce(m, sh.fred, MaxOp());
  RowFilter f{m, mp, Boundary{0, ~0ull}, 0.f, m == -INFINITY};  // (no filter: every token)
  if (f.empty) return f;
  unsigned long long k_dropped = 0;  // top-k ties at b.key that top-k drops (by token id)
  if (k > 0 && k < vocab) {
    const Selected s = radix_select(row, sh, static_cast<unsigned long long>(k), [](float, uint32_t) { return 1ull; });
    f.b = Boundary{s.key, static_cast<unsigned long long>(k) - s.above};
    k_dropped = s.at - f.b.keep;
  }
  if (p < 1.f) {
    // weights of the tokens top-k keeps: every tie at its boundary counted, the dropped ones
    // taken off their bin (they weigh the same: equal logits)
    const uint32_t tk = f.b.key;
    auto weight = [&](float x, uint32_t key) { return key < tk ? 0ull : fixed_mass(f.min_p_e(x), mass_scale); };
    const unsigned long long less = k_dropped * fixed_mass(f.min_p_e(key_value(tk)), mass_scale);
    unsigned long long total = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float x = row.x(i);
      total += weight(x, order_key(x));
    }
    total = block_reduce(total, sh.ured, SumOp()) - less;
    const unsigned long long target = top_p_target(p, total);
    const Selected s = radix_select(row, sh, target, weight, tk, less);
    const unsigned long long tie = fixed_mass(f.min_p_e(key_value(s.key)), mass_scale);
    f.b = combine(f.b, Boundary{s.key, top_p_ties_kept(target, s.above, tie)});
  }
  // kept: key > b.key, and the first b.keep tokens (by id) with key == b.key
  float z = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = row.x(i);
    if (order_key(x) > f.b.key) z += f.min_p_e(x);
  }
  z = block_reduce(z, sh.fred, SumOp());
  if (f.b.keep != ~0ull) z += static_cast<float>(f.b.keep) * f.min_p_e(key_value(f.b.key));
  f.z = z;
  return f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    target_probs_kernel(const T* __restrict__ logits, int64_t row_stride, float* __restrict__ out, int64_t vocab,
                        const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                        const float* __restrict__ top_p, const float* __restrict__ min_p, float mass_scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared& sh = *reinterpret_cast<Shared*>(smem);
  const int64_t r = blockIdx.x;
  const Row<T> row{logits + r * row_stride, vocab, temperature[r]};
  float* o = out + r * vocab;
  const RowFilter f = filter_row(row, sh, top_k ? top_k[r] : vocab, top_p ? top_p[r] : 1.f,
                                 min_p ? min_p[r] : 0.f, mass_scale);
  if (f.empty) {  // nothing to sample (softmax gives NaN too)
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) o[i] = NAN;
    return;
  }
  const Boundary b = f.b;
  auto min_p_e = [&](float x) { return f.min_p_e(x); };
  const float inv = 1.f / f.z;
  if (b.keep == ~0ull) {  // no filter: no tie to rank
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) o[i] = min_p_e(row.x(i)) * inv;
    return;
  }
  // tiles of kThreads * kPerThread tokens, 8 consecutive a thread: a block scan ranks the ties
  unsigned long long ties_before = 0;  // in earlier tiles
  for (int64_t tile = 0; tile < vocab; tile += int64_t{kThreads} * kPerThread) {
    const int64_t base = tile + int64_t{threadIdx.x} * kPerThread;
    const int64_t end = base + kPerThread < vocab ? base + kPerThread : vocab;
    unsigned mine = 0;
    for (int64_t i = base; i < end; ++i) mine += order_key(row.x(i)) == b.key ? 1u : 0u;
    unsigned tile_ties = 0;
    const unsigned rank = block_exclusive_sum(mine, sh.scan, tile_ties);
    unsigned long long next = ties_before + rank;
    for (int64_t i = base; i < end; ++i) {
      const float x = row.x(i);
      const uint32_t key = order_key(x);
      const bool kept = key > b.key || (key == b.key && next++ < b.keep);
      o[i] = kept ? min_p_e(x) * inv : 0.f;
    }
    ties_before += tile_ties;
  }
}

}  // namespace cuda
}  // namespace medusa_vllm
