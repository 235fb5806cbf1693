// The rejection_walk kernel (host function in rejection_walk_cuda.cu): one 1024-thread block per
// request walks its tree (rejection_walk.h): per level the current node's row target (one sweep
// for an online max and normaliser, or a greedy request's argmax; with filters, target_probs'
// passes: filter_row), the children's acceptance by thread 0; at the stopping node two sweeps
// for the final draw (the total fixed-point mass, then a block scan over 8 consecutive tokens a
// thread, boundary ties ranked by id, until the threshold is passed). No
// [B, V] tensor is written, no host sync. Pure CUDA (no ATen), so tests/kernels/cuda_emulation
// runs it on a CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "block_ops.cuh"
#include "rejection_walk.h"
#include "target_probs_cuda.cuh"

namespace medusa_vllm {
namespace cuda {

constexpr int kWalkPerThread = 8;  // consecutive tokens a thread takes per scan tile

struct WalkShared {
  Shared tp;  // target_probs' radix selects (filtered rows)
  float fred[kWarps];
  unsigned long long ured[kWarps];
  unsigned scan[kWarps];
  Children kids;
  bool kid_kept[kMaxChildren];    // (filtered rows) whether the filters keep each child's token
  int64_t removed[kMaxChildren];  // the offered children's tokens (the draw leaves them out)
  int n_removed;
  unsigned long long removed_mass;  // their kept mass
  int accepted;  // the child accepted at this level, -1: none
};

// A row's target (every thread holds the same): softmax(x / T) after the request's filters
// (target_probs.h: filter_row), or without one, or the point mass at the argmax.
template <typename T>
struct RowTarget {
  Row<T> row;
  bool greedy;
  bool filtered;
  float m;  // (no filter) max of x / T
  float z;  // sum of the kept e
  int64_t argmax;  // (greedy)
  RowFilter f;     // (filtered)
  __device__ float x(int64_t i) const { return row.x(i); }
  __device__ bool empty() const { return !greedy && (filtered ? f.empty : m == -INFINITY); }
  __device__ bool ranked() const { return filtered && f.b.keep != ~0ull; }  // ties at a boundary
  // 1: kept, 0: dropped, -1: tied at the boundary (kept if among the first b.keep by id)
  __device__ int side(int64_t i) const {
    if (!ranked()) return 1;
    const uint32_t key = order_key(x(i));
    return key > f.b.key ? 1 : (key < f.b.key ? 0 : -1);
  }
  __device__ float e(int64_t i) const { return filtered ? f.min_p_e(x(i)) : expf(x(i) - m); }
  __device__ float prob(int64_t t, bool kept) const {
    if (greedy) return t == argmax ? 1.f : 0.f;
    return kept ? e(t) / z : 0.f;
  }
  __device__ unsigned long long mass(int64_t i, float scale) const {
    return greedy ? (i == argmax ? fixed_mass(1.f, scale) : 0ull) : fixed_mass(e(i), scale);
  }
};

// The row's target, every thread taking part: a greedy row's argmax (lowest id of equal
// maxima); a filtered row's filter_row; otherwise one sweep for the max and normaliser (online:
// each thread rescales its partial sum when its max grows).
template <typename T>
__device__ RowTarget<T> row_target(const T* logits, const WalkParams& p, float temperature, const RequestFilter& rf,
                                   WalkShared& sh) {
  const int64_t vocab = p.vocab;
  RowTarget<T> t{Row<T>{logits, vocab, temperature}, temperature <= kGreedyTemperature, false, -INFINITY, 0.f, 0,
                 RowFilter{}};
  if (t.greedy) {
    float best = -INFINITY;
    int64_t idx = vocab;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = static_cast<float>(logits[i]);
      if (v > best) {
        best = v;
        idx = i;
      }
    }
    const float m = block_reduce(best, sh.fred, MaxOp());
    const unsigned long long mine = best == m ? static_cast<unsigned long long>(idx) : vocab;
    const unsigned long long first = block_reduce(mine, sh.ured, MinOp());
    t.argmax = first < static_cast<unsigned long long>(vocab) ? static_cast<int64_t>(first) : 0;
    return t;
  }
  if (rf.any(vocab)) {
    t.filtered = true;
    t.f = filter_row(t.row, sh.tp, rf.top_k, rf.top_p, rf.min_p, p.scale);
    t.z = t.f.z;
    return t;
  }
  float m = -INFINITY, s = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = t.x(i);
    if (v == -INFINITY) continue;
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  t.m = block_reduce(m, sh.fred, MaxOp());
  t.z = block_reduce(m == -INFINITY ? 0.f : s * expf(m - t.m), sh.fred, SumOp());
  return t;
}

// How many tokens before `t` tie at the boundary key (every thread taking part).
template <typename T>
__device__ unsigned long long ties_before(const RowTarget<T>& row, int64_t t, WalkShared& sh) {
  unsigned long long n = 0;
  for (int64_t i = threadIdx.x; i < t; i += kThreads) n += order_key(row.x(i)) == row.f.b.key ? 1ull : 0ull;
  return block_reduce(n, sh.ured, SumOp());
}

// The final token at the stopping row (rejection_walk.h), every thread taking part.
template <typename T>
__device__ int64_t draw(const RowTarget<T>& row, int64_t vocab, float u, float scale, WalkShared& sh) {
  if (row.empty()) return 0;
  const int n_removed = sh.n_removed;
  auto removed = [&](int64_t i) {
    for (int k = 0; k < n_removed; ++k)
      if (sh.removed[k] == i) return true;
    return false;
  };
  // the kept mass: above the boundary by a sweep, the kept ties (equal mass) by their count
  unsigned long long all = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads)
    if (row.side(i) == 1) all += row.mass(i, scale);
  all = block_reduce(all, sh.ured, SumOp());
  if (row.ranked()) all += row.f.b.keep * fixed_mass(row.f.min_p_e(key_value(row.f.b.key)), scale);
  const unsigned long long rest = all - sh.removed_mass;
  const bool use_rest = rest > 0;
  const unsigned long long total = use_rest ? rest : all;
  if (total == 0) return row.greedy ? row.argmax : 0;
  const unsigned long long x = draw_threshold(u, total);
  unsigned long long base = 0;  // mass of the earlier tiles
  unsigned long long tied = 0;  // boundary ties in the earlier tiles
  for (int64_t tile = 0; tile < vocab; tile += int64_t{kThreads} * kWalkPerThread) {
    const int64_t start = tile + int64_t{threadIdx.x} * kWalkPerThread;
    const int64_t end = start + kWalkPerThread < vocab ? start + kWalkPerThread : vocab;
    int side[kWalkPerThread];
    unsigned my_ties = 0;
    for (int k = 0; k < kWalkPerThread; ++k) {
      side[k] = start + k < end ? row.side(start + k) : 0;
      my_ties += side[k] == -1 ? 1u : 0u;
    }
    unsigned long long rank = tied;
    if (row.ranked()) {
      unsigned tile_ties = 0;
      rank += block_exclusive_sum(my_ties, sh.scan, tile_ties);
      tied += tile_ties;
    }
    unsigned long long w[kWalkPerThread];
    unsigned long long mine = 0;
    for (int k = 0; k < kWalkPerThread; ++k) {
      const int64_t i = start + k;
      const bool kept = side[k] == 1 || (side[k] == -1 && rank++ < row.f.b.keep);
      w[k] = kept && !(use_rest && removed(i)) ? row.mass(i, scale) : 0ull;
      mine += w[k];
    }
    unsigned long long tile_total = 0;
    unsigned long long cum = base + block_exclusive_sum(mine, sh.ured, tile_total);
    unsigned long long found = vocab;
    for (int k = 0; k < kWalkPerThread && start + k < end; ++k) {
      cum += w[k];
      if (cum > x) {
        found = static_cast<unsigned long long>(start + k);
        break;
      }
    }
    found = block_reduce(found, sh.ured, MinOp());
    if (found < static_cast<unsigned long long>(vocab)) return static_cast<int64_t>(found);
    base += tile_total;
  }
  return vocab - 1;  // not reached: x < total
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rejection_walk_kernel(const T* __restrict__ logits, WalkParams p) {
  extern __shared__ __align__(16) unsigned char smem[];  // sizeof(WalkShared), given at launch
  WalkShared& sh = *reinterpret_cast<WalkShared*>(smem);
  const int64_t b = blockIdx.x;
  const int64_t q = p.slots;
  const int64_t* row_of_node = p.row_of_node + b * q;
  const int64_t* children = p.children + b * q * p.width;
  const int64_t* drafts = p.drafts + b * (q - 1);
  const bool* valid = p.valid + b * q;
  const float temperature = p.temperature[b];
  const RequestFilter rf = request_filter(p, b);
  const float* accept_u = p.accept_u + b * p.levels * p.width;
  int64_t* accepted = p.accepted + b * (p.levels - 1);
  int64_t cur = 0;
  for (int level = 0; level < p.levels; ++level) {
    int64_t r = row_of_node[cur];
    r = r < 0 ? 0 : (r >= p.rows ? p.rows - 1 : r);
    const RowTarget<T> row = row_target(logits + r * p.row_stride, p, temperature, rf, sh);
    if (threadIdx.x == 0) load_children(sh.kids, children, p.width, cur, drafts, valid);
    __syncthreads();
    // which children's tokens the filters keep (a tie at the boundary: by its rank among them)
    for (int j = 0; j < sh.kids.n; ++j) {
      const int64_t tok = sh.kids.token[j];
      const int side = sh.kids.offered[j] && !row.empty() ? row.side(tok) : 0;
      const bool kept = side == 1 || (side == -1 && ties_before(row, tok, sh) < row.f.b.keep);
      if (threadIdx.x == 0) sh.kid_kept[j] = kept;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const Children& c = sh.kids;
      float pr[kMaxChildren];
      int n = 0;
      unsigned long long removed_mass = 0;
      for (int j = 0; j < c.n; ++j) {
        pr[j] = c.offered[j] ? row.prob(c.token[j], sh.kid_kept[j]) : 0.f;
        if (!c.offered[j]) continue;
        sh.removed[n++] = c.token[j];
        if (sh.kid_kept[j] || row.greedy) removed_mass += row.mass(c.token[j], p.scale);
      }
      sh.n_removed = n;
      sh.removed_mass = removed_mass;
      // (the last level's nodes are leaves: the walk stops there)
      const int j = level + 1 < p.levels ? first_accepted(pr, accept_u + level * p.width, c.n) : -1;
      sh.accepted = j;
      if (j >= 0) accepted[level] = c.id[j];
    }
    __syncthreads();
    const int j = sh.accepted;
    if (j >= 0) {
      cur = sh.kids.id[j];  // (read before the next level's first barrier; written after it)
      continue;
    }
    const int64_t tok = draw(row, p.vocab, p.final_u[b], p.scale, sh);
    if (threadIdx.x == 0) p.final_token[b] = tok;
    break;
  }
  if (threadIdx.x == 0) p.last_node[b] = cur;
}

}  // namespace cuda
}  // namespace medusa_vllm
