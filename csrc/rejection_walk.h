// The lossless rejection walk of a sampled tree step in one op, shared by rejection_walk_cpu.cpp
// and rejection_walk_cuda.cuh; the PyTorch reference is medusa_vllm.kernels.reference.
// rejection_walk_ref (the walk of medusa_vllm.verify.verify_rejection, with target_probs' filters).
//
// Per request, from the root: the target at the current node's row is softmax(x / T) after the
// request's min-p, top-k and top-p, exactly as target_probs.h filters (a greedy request,
// T <= 1e-5: the point mass at its argmax, the lowest id of equal maxima); the node's
// children are offered in rank order (a verified child whose token no earlier verified sibling
// holds); child j is accepted with probability p(x_j) / (1 - the earlier offered children's p),
// tested against the request's uniform for (level, j). An accepted child becomes the current
// node; where none is, the walk stops and draws the final token from the node's target without
// its offered children's tokens (the whole target where they held all of its mass): the first
// token whose cumulative fixed-point mass (target_probs.h) exceeds u times the total, so the
// CPU and the GPU draw the same token from the same masses whatever their summation order.
//
// Outputs per request: the accepted node per level (-1 past the last), the node the walk
// stopped at, the final token. Probabilities, not the whole [B, V] distributions, are what the
// walk reads: a pass per level for the row's max and normaliser, two for the final draw.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "target_probs.h"

namespace medusa_vllm {

constexpr float kGreedyTemperature = 1e-5f;  // medusa_vllm.sampling._EPS_TEMPERATURE
constexpr int kMaxChildren = 64;             // children per node the op takes (Medusa: the top-k, ~10)

// The raw pointers of one call (the shapes of host_checks.h: check_rejection_walk_args).
struct WalkParams {
  const int64_t* row_of_node;  // [B, Q]
  const int64_t* children;     // [B, Q, C]
  const int64_t* drafts;       // [B, Q-1]
  const bool* valid;           // [B, Q]
  const float* temperature;    // [B]
  const int32_t* top_k;        // [B] or null (off: <= 0 or >= V)
  const float* top_p;          // [B] or null (off: >= 1)
  const float* min_p;          // [B] or null (off: <= 0)
  const float* accept_u;       // [B, L, C]
  const float* final_u;        // [B]
  int64_t* accepted;           // [B, L-1]
  int64_t* last_node;          // [B]
  int64_t* final_token;        // [B]
  int64_t rows, vocab, row_stride, slots;
  int width, levels;
  float scale;  // fixed-point mass scale (target_probs.h)
};

// A request's filters (target_probs.h; off: top_k <= 0 or >= V, top_p >= 1, min_p <= 0).
struct RequestFilter {
  int64_t top_k;
  float top_p;
  float min_p;
  MEDUSA_VLLM_HD bool any(int64_t vocab) const { return (top_k > 0 && top_k < vocab) || top_p < 1.f || min_p > 0.f; }
};

MEDUSA_VLLM_HD RequestFilter request_filter(const WalkParams& p, int64_t b) {
  return RequestFilter{p.top_k ? p.top_k[b] : p.vocab, p.top_p ? p.top_p[b] : 1.f, p.min_p ? p.min_p[b] : 0.f};
}

// A node's children as the walk offers them, in rank order.
struct Children {
  int n;
  int64_t id[kMaxChildren];
  int64_t token[kMaxChildren];
  bool offered[kMaxChildren];
};

// The children of node `node` of one request: `children` [Q, C] node ids (-1: none), `drafts`
// the token of node i at i - 1 (negative tokens read as 0, as the reference clamps them),
// `valid` [Q] whether a node was verified. A child is offered if it exists, was verified, and no
// earlier verified sibling holds its token (a token offered twice is worth its first offer).
MEDUSA_VLLM_HD void load_children(Children& c, const int64_t* children, int width, int64_t node,
                                  const int64_t* drafts, const bool* valid) {
  c.n = width;
  for (int j = 0; j < width; ++j) {
    const int64_t id = children[node * width + j];
    const bool ok = id >= 0 && valid[id];
    const int64_t tok = id >= 1 && drafts[id - 1] > 0 ? drafts[id - 1] : 0;
    bool dup = false;
    for (int i = 0; i < j; ++i) dup = dup || (c.id[i] >= 0 && valid[c.id[i]] && c.token[i] == tok);
    c.id[j] = id;
    c.token[j] = tok;
    c.offered[j] = ok && !dup;
  }
}

// The first child accepted: the first j with p[j] > 0 and u[j] < p[j] / (1 - sum of the earlier
// p), in the reference's float32 order (remaining = 1 - (cumsum_j - p_j)); -1 if none.
MEDUSA_VLLM_HD int first_accepted(const float* p, const float* u, int n) {
  float cs = 0.f;
  for (int j = 0; j < n; ++j) {
    cs += p[j];
    const float remaining = 1.f - (cs - p[j]);
    const float accept = remaining > 0.f ? p[j] / (remaining > 1e-30f ? remaining : 1e-30f) : 0.f;
    if (u[j] < accept && p[j] > 0.f) return j;
  }
  return -1;
}

// The draw's threshold: floor(u * total) (u in [0, 1)), in double as both devices compute it.
MEDUSA_VLLM_HD uint64_t draw_threshold(float u, uint64_t total) {
  const uint64_t x = static_cast<uint64_t>(static_cast<double>(u) * static_cast<double>(total));
  return x < total ? x : total - 1;
}

}  // namespace medusa_vllm
