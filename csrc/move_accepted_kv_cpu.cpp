// CPU host function of move_accepted_kv: checks, validation of the accepted lists (host
// memory here), then at::parallel_for over (layer, request). Dtype-agnostic (copies bytes).
#include <ATen/Parallel.h>

#include <vector>

#include "host_checks.h"
#include "move_accepted_kv.h"
#include "ops.h"

namespace medusa_vllm {
namespace {

// The CUDA kernel silently stops at an invalid entry; here we can afford to say what is wrong.
void validate_accepted(const MoveAcceptedParams& p, int64_t num_tokens, int64_t num_slots) {
  for (int b = 0; b < p.num_requests; ++b) {
    const int q_start = p.query_start_loc[b];
    const int q_len = p.query_start_loc[b + 1] - q_start;
    TORCH_CHECK(q_start >= 0 && q_len >= 0 && q_start + q_len <= num_tokens,
                "move_accepted_kv: query_start_loc must be non-decreasing within [0, ", num_tokens,
                "] (request ", b, ")");
    int prev = 0;
    for (int k = 0; k < p.num_accepted_cols; ++k) {
      const int idx = p.accepted[b * p.accepted_stride + k];
      if (idx < 0) break;
      TORCH_CHECK(idx > prev && idx < q_len, "move_accepted_kv: accepted[", b, ", ", k, "] = ", idx,
                  " must be a window index in (", prev, ", ", q_len,
                  ") (strictly increasing, 1 <= idx < q_len, -1 terminated)");
      prev = idx;
      for (const int w : {idx, k + 1}) {
        const int64_t slot = p.slot_mapping[q_start + w];
        TORCH_CHECK(slot < num_slots, "move_accepted_kv: slot_mapping[", q_start + w, "] = ", slot,
                    " is outside the cache (", num_slots, " slots)");
      }
    }
  }
}

}  // namespace

void move_accepted_kv_cpu(at::TensorList k_caches, at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                          const at::Tensor& accepted) {
  const MoveAcceptedParams p =
      check_move_accepted_args(k_caches, v_caches, slot_mapping, query_start_loc, accepted);
  TORCH_CHECK(k_caches[0].device().is_cpu(), "move_accepted_kv_cpu: inputs must be CPU tensors");
  validate_accepted(p, slot_mapping.size(0), k_caches[0].size(0) * k_caches[0].size(1));

  std::vector<char*> k_ptrs, v_ptrs;  // [num_layers]
  for (size_t l = 0; l < k_caches.size(); ++l) {
    k_ptrs.push_back(static_cast<char*>(k_caches[l].data_ptr()));
    v_ptrs.push_back(static_cast<char*>(v_caches[l].data_ptr()));
  }
  const int64_t num_layers = static_cast<int64_t>(k_ptrs.size());
  const int64_t tasks = num_layers * p.num_requests;
  at::parallel_for(0, tasks, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t layer = task / p.num_requests;
      cpu::move_accepted_request(p, static_cast<int>(task % p.num_requests), k_ptrs[layer],
                                 v_ptrs[layer]);
    }
  });
}

}  // namespace medusa_vllm
