// Host entry points of the medusa_vllm ops (registered in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace medusa_vllm {

// Schemas (bindings.cpp):
//   tree_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache,
//                  Tensor block_table, Tensor seq_lens, Tensor query_start_loc,
//                  Tensor tree_masks, Tensor req_tree_ids,
//                  float scale, float softcap, int num_splits) -> ()
//   move_accepted_kv(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slot_mapping,
//                    Tensor query_start_loc, Tensor accepted) -> ()
//   keyed_uniforms(Tensor keys, int n) -> Tensor
//   target_probs(Tensor logits, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor? min_p) -> Tensor
//   rejection_walk(Tensor logits, Tensor row_of_node, Tensor children, Tensor drafts, Tensor valid,
//                  Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor? min_p, Tensor accept_u,
//                  Tensor final_u) -> (Tensor, Tensor, Tensor)

void tree_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                        const at::Tensor& tree_masks, const at::Tensor& req_tree_ids,
                        double scale, double softcap, int64_t num_splits);

void move_accepted_kv_cpu(at::TensorList k_caches, at::TensorList v_caches,
                          const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                          const at::Tensor& accepted);

at::Tensor keyed_uniforms_cpu(const at::Tensor& keys, int64_t n);

at::Tensor target_probs_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                            const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                            const c10::optional<at::Tensor>& min_p);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_walk_cpu(
    const at::Tensor& logits, const at::Tensor& row_of_node, const at::Tensor& children, const at::Tensor& drafts,
    const at::Tensor& valid, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p, const at::Tensor& accept_u,
    const at::Tensor& final_u);

#ifdef MEDUSA_VLLM_WITH_CUDA
void tree_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                         const at::Tensor& tree_masks, const at::Tensor& req_tree_ids,
                         double scale, double softcap, int64_t num_splits);

void move_accepted_kv_cuda(at::TensorList k_caches, at::TensorList v_caches,
                           const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                           const at::Tensor& accepted);

at::Tensor keyed_uniforms_cuda(const at::Tensor& keys, int64_t n);

at::Tensor target_probs_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                             const c10::optional<at::Tensor>& min_p);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_walk_cuda(
    const at::Tensor& logits, const at::Tensor& row_of_node, const at::Tensor& children, const at::Tensor& drafts,
    const at::Tensor& valid, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p, const at::Tensor& accept_u,
    const at::Tensor& final_u);
#endif

}  // namespace medusa_vllm
