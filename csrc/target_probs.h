// The filtered target distribution of a sampled tree step, shared by target_probs_cpu.cpp and
// target_probs_cuda.cu; the PyTorch reference is medusa_vllm.kernels.reference.target_probs_ref.
//
// Per row (logits x_i / T, vLLM's sampler's order: min-p, then top-k, then top-p), with the
// tie rule of vLLM's Triton top-k/top-p kernel (a stable sort: of equal logits the lower token
// id comes first):
//   e_i = exp(x_i - max x)                       in [0, 1], the row's top token has e = 1
//   min-p keeps e_i >= min_p                     (vLLM: prob_i >= min_p * max prob)
//   top-k keeps the k largest x                  (exactly k: ties with the k-th by token id)
//   top-p keeps, of the tokens kept so far in that order, the shortest prefix whose mass
//         reaches p of their mass                (ties at the boundary by token id)
//   probs_i = e_i / sum of kept e                (0 elsewhere)
//
// No sort. Each threshold is a radix select over an order-preserving 32-bit key of x, a byte
// per pass from the top (4 passes): a histogram of the candidates whose key matches the bytes
// chosen so far, and the largest byte whose bucket and everything above it reach the target.
// Top-k counts tokens; top-p sums fixed-point masses (uint64: integer sums are associative, so
// every device and every thread order gives the same threshold; a row's masses sum below 2^62).
// The select ends on the boundary key t with the weight above it; tokens with key > t are kept
// and of the tokens with key == t (equal x, so equal mass) the first n by token id: n = k minus
// the count above (top-k), ceil((target - mass above) / the tie's mass) (top-p).
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace medusa_vllm {

// float -> uint32 in the same order (-inf lowest, +inf highest, -0 the same as +0); a NaN sorts
// outside them.
MEDUSA_VLLM_HD uint32_t order_key(float x) {
  if (x == 0.f) x = 0.f;
#if defined(__CUDA_ARCH__)
  const uint32_t b = __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// log2 of the fixed-point scale of a row of `vocab` masses in [0, 1]: their sum stays below 2^62.
MEDUSA_VLLM_HD int mass_scale_log2(int64_t vocab) {
  int bits = 0;
  while ((int64_t{1} << bits) < vocab) ++bits;
  return 62 - bits;
}

// The float whose order_key is `key` (+0 for the key of 0).
MEDUSA_VLLM_HD float key_value(uint32_t key) {
  const uint32_t b = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// e in [0, 1] as a fixed-point mass (scale = 2^mass_scale_log2(vocab), as a float)
MEDUSA_VLLM_HD uint64_t fixed_mass(float e, float scale) {
  return static_cast<uint64_t>(e * scale);
}

// The top-p target: ceil(p * total), at least 1 (the top token always stays).
MEDUSA_VLLM_HD uint64_t top_p_target(float p, uint64_t total) {
  const double t = static_cast<double>(p) * static_cast<double>(total);
  uint64_t target = static_cast<uint64_t>(t);
  if (static_cast<double>(target) < t) ++target;
  if (target > total) target = total;
  return target > 0 ? target : 1;
}

// What a radix select ends on.
struct Selected {
  uint32_t key;    // the largest key t with weight(keys >= t) >= target
  uint64_t above;  // weight(keys > t)
  uint64_t at;     // weight(keys == t)
};

// The boundary of a filter: keys > key are kept, and the first `keep` tokens (by id) with key == key.
struct Boundary {
  uint32_t key;
  uint64_t keep;
};

// How many of the tokens tied at the top-p boundary stay: the fewest whose mass, each `tie`, takes
// the mass above the boundary to the target (>= 1: the mass above is below the target).
MEDUSA_VLLM_HD uint64_t top_p_ties_kept(uint64_t target, uint64_t above, uint64_t tie) {
  return (target - above + tie - 1) / tie;
}

// The boundary of both filters: the higher key; at one key, the fewer tokens (the top-p
// boundary is never below the top-k one: top-p picks among the tokens top-k keeps).
MEDUSA_VLLM_HD Boundary combine(Boundary a, Boundary b) {
  if (a.key != b.key) return a.key > b.key ? a : b;
  return Boundary{a.key, a.keep < b.keep ? a.keep : b.keep};
}

// One radix-select step: hist[256] holds the weights of the candidates by the current byte;
// `above` the weight of the candidates above the current bucket. Returns the largest byte d with
// above + sum(hist[d..255]) >= target and adds sum(hist[d+1..255]) to above (0 if none reaches).
template <typename W>
MEDUSA_VLLM_HD int select_byte(const W* hist, W& above, W target) {
  W cum = above;
  for (int d = 255; d >= 0; --d) {
    if (cum + hist[d] >= target) {
      above = cum;
      return d;
    }
    cum += hist[d];
  }
  above = cum;
  return 0;
}

}  // namespace medusa_vllm
