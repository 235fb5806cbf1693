// The rejection_walk kernel (host function in rejection_walk_cuda.cu): one 1024-thread block per
// request walks its tree (rejection_walk.h): per level one sweep over the current node's row
// (an online max and normaliser, or the argmax of a greedy request), the children's acceptance
// by thread 0; at the stopping node two sweeps for the final draw (the total fixed-point mass,
// then a block scan over 8 consecutive tokens a thread until the threshold is passed). No
// [B, V] tensor is written, no host sync. Pure CUDA (no ATen), so tests/kernels/cuda_emulation
// runs it on a CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "block_ops.cuh"
#include "rejection_walk.h"

namespace medusa_vllm {
namespace cuda {

constexpr int kWalkPerThread = 8;  // consecutive tokens a thread takes per scan tile

struct WalkShared {
  float fred[kWarps];
  unsigned long long ured[kWarps];
  Children kids;
  int64_t removed[kMaxChildren];  // the offered children's tokens (the draw leaves them out)
  int n_removed;
  int accepted;  // the child accepted at this level, -1: none
};

// A row's target (every thread holds the same): softmax(x / T), or the point mass at the argmax.
template <typename T>
struct RowTarget {
  const T* logits;
  float temperature;
  bool greedy;
  float m;
  float z;
  int64_t argmax;
  __device__ float x(int64_t i) const { return static_cast<float>(logits[i]) / temperature; }
  __device__ bool empty() const { return !greedy && m == -INFINITY; }
  __device__ float prob(int64_t t) const { return greedy ? (t == argmax ? 1.f : 0.f) : expf(x(t) - m) / z; }
  __device__ unsigned long long mass(int64_t i, float scale) const {
    return greedy ? (i == argmax ? fixed_mass(1.f, scale) : 0ull) : fixed_mass(expf(x(i) - m), scale);
  }
};

// One sweep: the max and normaliser (online: each thread rescales its partial sum when its max
// grows), or the argmax (lowest id of equal maxima) of a greedy row.
template <typename T>
__device__ RowTarget<T> row_target(const T* logits, int64_t vocab, float temperature, WalkShared& sh) {
  RowTarget<T> t{logits, temperature, temperature <= kGreedyTemperature, -INFINITY, 0.f, 0};
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
  unsigned long long rest = 0, all = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const unsigned long long w = row.mass(i, scale);
    all += w;
    rest += removed(i) ? 0ull : w;
  }
  rest = block_reduce(rest, sh.ured, SumOp());
  all = block_reduce(all, sh.ured, SumOp());
  const bool use_rest = rest > 0;
  const unsigned long long total = use_rest ? rest : all;
  if (total == 0) return row.greedy ? row.argmax : 0;
  const unsigned long long x = draw_threshold(u, total);
  unsigned long long base = 0;  // mass of the earlier tiles
  for (int64_t tile = 0; tile < vocab; tile += int64_t{kThreads} * kWalkPerThread) {
    const int64_t start = tile + int64_t{threadIdx.x} * kWalkPerThread;
    const int64_t end = start + kWalkPerThread < vocab ? start + kWalkPerThread : vocab;
    unsigned long long w[kWalkPerThread];
    unsigned long long mine = 0;
    for (int k = 0; k < kWalkPerThread; ++k) {
      const int64_t i = start + k;
      w[k] = i < end && !(use_rest && removed(i)) ? row.mass(i, scale) : 0ull;
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
  const float* accept_u = p.accept_u + b * p.levels * p.width;
  int64_t* accepted = p.accepted + b * (p.levels - 1);
  int64_t cur = 0;
  for (int level = 0; level < p.levels; ++level) {
    int64_t r = row_of_node[cur];
    r = r < 0 ? 0 : (r >= p.rows ? p.rows - 1 : r);
    const RowTarget<T> row = row_target(logits + r * p.row_stride, p.vocab, temperature, sh);
    if (threadIdx.x == 0) {
      Children& c = sh.kids;
      load_children(c, children, p.width, cur, drafts, valid);
      float pr[kMaxChildren];
      int n = 0;
      for (int j = 0; j < c.n; ++j) {
        pr[j] = c.offered[j] && !row.empty() ? row.prob(c.token[j]) : 0.f;
        if (c.offered[j]) sh.removed[n++] = c.token[j];
      }
      sh.n_removed = n;
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
