// The CPU passes of target_probs.h over one row, shared by target_probs_cpu.cpp and
// rejection_walk_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "target_probs.h"

namespace medusa_vllm {
namespace cpu {

struct RowParams {
  float temperature;
  int64_t top_k;   // off: >= vocab
  float top_p;     // off: >= 1
  float min_p;     // off: <= 0
};

// The radix select of target_probs.h (4 byte passes) over weight_of(i) of every token.
template <typename Weight>
inline Selected radix_select(const uint32_t* keys, int64_t n, uint64_t target, Weight weight_of) {
  uint32_t prefix = 0, mask = 0;
  uint64_t above = 0;
  uint64_t hist[256];
  int byte = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint64_t& h : hist) h = 0;
    for (int64_t i = 0; i < n; ++i) {
      if ((keys[i] & mask) != prefix) continue;
      hist[(keys[i] >> shift) & 0xFFu] += weight_of(i);
    }
    byte = select_byte(hist, above, target);
    prefix |= static_cast<uint32_t>(byte) << shift;
    mask |= 0xFFu << shift;
  }
  return Selected{prefix, above, hist[byte]};
}

// out = the row's filtered target: e_i = exp(x_i - max x) where kept, 0 elsewhere, divided by
// their sum when `normalize`; returns that sum (NaN everywhere and 0 for a row of -inf).
template <typename T>
inline double target_probs_row(const T* logits, float* out, int64_t vocab, const RowParams& rp,
                               std::vector<float>& x, std::vector<uint32_t>& keys, bool normalize = true) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    x[i] = static_cast<float>(logits[i]) / rp.temperature;
    keys[i] = order_key(x[i]);
    m = std::max(m, x[i]);
  }
  if (m == -std::numeric_limits<float>::infinity()) {  // nothing to sample (softmax gives NaN too)
    for (int64_t i = 0; i < vocab; ++i) out[i] = std::numeric_limits<float>::quiet_NaN();
    return 0.0;
  }
  auto min_p_e = [&](float xi) {  // e, or 0 where min-p drops the token
    const float e = std::exp(xi - m);
    return (rp.min_p > 0.f && e < rp.min_p) ? 0.f : e;
  };
  // out holds e_i, 0 where a filter drops the token
  for (int64_t i = 0; i < vocab; ++i) out[i] = min_p_e(x[i]);
  // keeps out[i] only for keys above b, and for the first b.keep tokens with key == b.key
  auto apply = [&](Boundary b) {
    uint64_t tied = 0;
    for (int64_t i = 0; i < vocab; ++i)
      if (keys[i] < b.key || (keys[i] == b.key && tied++ >= b.keep)) out[i] = 0.f;
  };
  Boundary boundary{0, UINT64_MAX};  // no filter: every token
  if (rp.top_k > 0 && rp.top_k < vocab) {
    const Selected s = radix_select(keys.data(), vocab, static_cast<uint64_t>(rp.top_k),
                                    [](int64_t) { return uint64_t{1}; });
    boundary = Boundary{s.key, static_cast<uint64_t>(rp.top_k) - s.above};
    apply(boundary);
  }
  if (rp.top_p < 1.f) {
    const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
    uint64_t total = 0;
    for (int64_t i = 0; i < vocab; ++i) total += fixed_mass(out[i], scale);
    const uint64_t target = top_p_target(rp.top_p, total);
    const Selected s = radix_select(keys.data(), vocab, target, [&](int64_t i) { return fixed_mass(out[i], scale); });
    const uint64_t tie = fixed_mass(min_p_e(key_value(s.key)), scale);
    boundary = combine(boundary, Boundary{s.key, top_p_ties_kept(target, s.above, tie)});
    apply(boundary);
  }
  double z = 0.0;  // (a float32 running sum over ~1e5 tokens drifts by ~1e-4)
  for (int64_t i = 0; i < vocab; ++i) z += out[i];
  if (!normalize) return z;
  const float inv = 1.f / static_cast<float>(z);
  for (int64_t i = 0; i < vocab; ++i) out[i] *= inv;
  return z;
}

}  // namespace cpu
}  // namespace medusa_vllm
