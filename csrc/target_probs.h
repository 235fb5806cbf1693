// The filtered target distribution of a sampled tree step, shared by target_probs_cpu.cpp and
// target_probs_cuda.cu; the PyTorch reference is medusa_vllm.kernels.reference.target_probs_ref.
//
// Per row (logits x_i / T, vLLM's sampler's order: min-p, then top-k, then top-p):
//   e_i = exp(x_i - max x)                       in [0, 1], the row's top token has e = 1
//   min-p keeps e_i >= min_p                     (vLLM: prob_i >= min_p * max prob)
//   top-k keeps x_i >= the k-th largest x        (ties with the k-th stay, vLLM's rule)
//   top-p keeps x_i >= t, t the largest value whose kept mass at or above it reaches p:
//         S(x >= t) >= p * S(all kept)           (ties with the boundary token stay)
//   probs_i = e_i / sum of kept e                (0 elsewhere)
//
// No sort. Each threshold is a radix select over an order-preserving 32-bit key of x, a byte
// per pass from the top (4 passes): a histogram of the candidates whose key matches the bytes
// chosen so far, and the largest byte whose bucket and everything above it reach the target.
// Top-k counts tokens; top-p sums fixed-point masses (uint64: integer sums are associative, so
// every device and every thread order gives the same threshold; a row's masses sum below 2^62).
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
