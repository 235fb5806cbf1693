// CPU host function of tree_attention: checks, per-request metadata validation (the metadata
// lives in host memory here, so it is checked before any pointer is followed), dtype dispatch
// and at::parallel_for over (request, kv head). num_splits is ignored on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "host_checks.h"
#include "ops.h"
#include "tree_attention_cpu.h"

namespace medusa_vllm {
namespace {

void validate_request_metadata(const TreeAttentionParams<void>& p, int64_t max_blocks,
                               int64_t num_blocks) {
  TORCH_CHECK(p.query_start_loc[0] >= 0, "tree_attention: query_start_loc[0] must be >= 0");
  for (int b = 0; b < p.num_requests; ++b) {
    const int q_start = p.query_start_loc[b];
    const int q_len = p.query_start_loc[b + 1] - q_start;
    const int seq_len = p.seq_lens[b];
    TORCH_CHECK(q_len >= 0, "tree_attention: query_start_loc must be non-decreasing (request ", b, ")");
    TORCH_CHECK(q_start + q_len <= p.num_tokens, "tree_attention: query_start_loc[", b + 1, "] = ",
                q_start + q_len, " exceeds num_tokens = ", p.num_tokens);
    if (q_len == 0) continue;
    TORCH_CHECK(q_len <= p.masks.q_max, "tree_attention: request ", b, " has q_len ", q_len,
                " > Q_MAX = ", p.masks.q_max, " (tree_masks.size(1))");
    TORCH_CHECK(seq_len >= q_len, "tree_attention: request ", b, " has seq_len ", seq_len,
                " < q_len ", q_len, " (seq_lens must include the query tokens)");
    const int tree = p.req_tree_ids[b];
    TORCH_CHECK(tree >= 0 && tree < p.masks.num_trees, "tree_attention: req_tree_ids[", b, "] = ",
                tree, " is not in [0, ", p.masks.num_trees, ")");
    const int64_t blocks = (seq_len + p.kv.block_size - 1) / p.kv.block_size;
    TORCH_CHECK(blocks <= max_blocks, "tree_attention: request ", b, " needs ", blocks,
                " blocks for seq_len ", seq_len, " but block_table has ", max_blocks, " columns");
    for (int64_t i = 0; i < blocks; ++i) {
      const int32_t block = p.kv.block_table[b * p.kv.block_table_stride + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "tree_attention: block_table[", b, ", ", i,
                  "] = ", block, " is not a block id in [0, ", num_blocks, ")");
    }
  }
}

template <typename T>
void run_tree_attention(const TreeAttentionParams<T>& p) {
  const int64_t tasks = static_cast<int64_t>(p.num_requests) * p.num_kv_heads;
  at::parallel_for(0, tasks, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    cpu::TreeAttentionScratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      cpu::tree_attention_task(p, static_cast<int>(task / p.num_kv_heads),
                               static_cast<int>(task % p.num_kv_heads), scratch);
    }
  });
}

}  // namespace

void tree_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                        const at::Tensor& tree_masks, const at::Tensor& req_tree_ids,
                        double scale, double softcap, int64_t /*num_splits*/) {
  const TreeAttentionShape s = check_tree_attention_args(
      out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_masks, req_tree_ids,
      softcap);
  TORCH_CHECK(q.device().is_cpu(), "tree_attention_cpu: inputs must be CPU tensors");
  // Metadata checks use the dtype-independent fields only.
  const auto meta = make_tree_attention_params<void>(out, q, k_cache, v_cache, block_table, seq_lens,
                                                     query_start_loc, tree_masks, req_tree_ids, s,
                                                     scale, softcap);
  validate_request_metadata(meta, block_table.size(1), k_cache.size(0));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_cpu", [&] {
    run_tree_attention(make_tree_attention_params<scalar_t>(
        out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_masks,
        req_tree_ids, s, scale, softcap));
  });
}

}  // namespace medusa_vllm
