// Core of move_accepted_kv, shared by the CPU and CUDA kernels.
//
// For request b, step k = 0, 1, ... copies the K/V entries of window index accepted[b, k]
// (slot slot_mapping[qsl[b] + accepted[b, k]]) to window index k + 1. Steps must run in
// ascending k for each (layer, head, element): a destination of one step can be the source of
// an earlier one (accepted = [2, 5]: 2 -> 1, then 5 -> 2), never of a later one, so reading the
// source of step k before writing its destination, in order, is correct.
#pragma once

#include <cstring>
#include <vector>

#include "paged_kv.h"

namespace medusa_vllm {

enum class MoveStep { kStop, kSkip, kCopy };

// Decodes step k of request b. Stops at the first negative entry (the -1 terminator), at an
// index outside the window, or when the destination would leave the window; skips no-op steps
// (accepted[b, k] == k + 1) and padding slots (< 0).
MEDUSA_HD MoveStep move_step(const MoveAcceptedParams& p, int b, int k, int q_start, int q_len,
                             int64_t* src_slot, int64_t* dst_slot) {
  const int idx = p.accepted[b * p.accepted_stride + k];
  if (idx < 0 || idx >= q_len || k + 1 >= q_len) return MoveStep::kStop;
  if (idx == k + 1) return MoveStep::kSkip;
  *src_slot = p.slot_mapping[q_start + idx];
  *dst_slot = p.slot_mapping[q_start + k + 1];
  if (*src_slot < 0 || *dst_slot < 0) return MoveStep::kSkip;
  return MoveStep::kCopy;
}

namespace cpu {

// One head's head_dim elements (byte stride `stride` between elements).
inline void copy_head(char* dst, const char* src, int64_t stride, const MoveAcceptedParams& p) {
  if (stride == p.elem_bytes) {
    std::memmove(dst, src, p.head_bytes);
    return;
  }
  for (int d = 0; d < p.head_dim; ++d) std::memcpy(dst + d * stride, src + d * stride, p.elem_bytes);
}

// All steps of request b in one layer (byte pointers to the layer's K and V views).
inline void move_accepted_request(const MoveAcceptedParams& p, int b, char* k, char* v) {
  const int q_start = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - q_start;
  for (int step = 0; step < p.num_accepted_cols; ++step) {
    int64_t src = 0, dst = 0;
    const MoveStep what = move_step(p, b, step, q_start, q_len, &src, &dst);
    if (what == MoveStep::kStop) break;
    if (what == MoveStep::kSkip) continue;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      copy_head(k + p.k_offset(dst, h), k + p.k_offset(src, h), p.k_stride_dim, p);
      copy_head(v + p.v_offset(dst, h), v + p.v_offset(src, h), p.v_stride_dim, p);
    }
  }
}

}  // namespace cpu
}  // namespace medusa_vllm
