// Input checks shared by the CPU and CUDA host functions, and the translation of checked
// tensors into the raw-pointer parameter structs of paged_kv.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "paged_kv.h"
#include "rejection_walk.h"

namespace medusa_vllm {

// Sizes of a checked tree_attention call.
struct TreeAttentionShape {
  int64_t num_tokens;    // N
  int64_t num_q_heads;   // Hq
  int64_t num_kv_heads;  // Hkv
  int64_t head_dim;      // D
  int64_t num_requests;  // B
  int64_t block_size;
  int64_t q_max;         // tree window rows
  int64_t mask_words;
};

inline void check_index_tensor(const char* op, const at::Tensor& t, const char* name,
                               at::ScalarType dtype, int64_t ndim, const at::Device& device) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
              t.device());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

// Any strides are accepted here (vLLM's CPU layout has K^T blocks); the CUDA host functions
// add check_unit_head_stride.
inline void check_kv_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name,
              " must be a 4-D view [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              t.sizes());
}

inline void check_unit_head_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(3) == 1, name, " must have unit stride on head_dim on CUDA, got strides ",
              t.strides());
}

inline TreeAttentionShape check_tree_attention_args(
    const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
    const at::Tensor& query_start_loc, const at::Tensor& tree_masks,
    const at::Tensor& req_tree_ids, double softcap) {
  TORCH_CHECK(q.dim() == 3, "tree_attention: q must be 3-D [num_tokens, num_q_heads, head_dim], got shape ",
              q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "tree_attention: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1,
              "tree_attention: q and out must be contiguous in head_dim, got strides ",
              q.strides(), " and ", out.strides());
  check_kv_view(k_cache, "tree_attention: k_cache");
  check_kv_view(v_cache, "tree_attention: v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "tree_attention: k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " must have the same shape");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(out.scalar_type() == dtype && k_cache.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype,
              "tree_attention: q, out, k_cache and v_cache must share one dtype, got ", dtype,
              ", ", out.scalar_type(), ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const auto device = q.device();
  TORCH_CHECK(out.device() == device && k_cache.device() == device && v_cache.device() == device,
              "tree_attention: q, out, k_cache and v_cache must be on one device");

  TreeAttentionShape s{};
  s.num_tokens = q.size(0);
  s.num_q_heads = q.size(1);
  s.head_dim = q.size(2);
  s.block_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "tree_attention: k_cache head_dim ",
              k_cache.size(3), " != q head_dim ", s.head_dim);
  TORCH_CHECK(s.num_kv_heads > 0 && s.num_q_heads % s.num_kv_heads == 0,
              "tree_attention: num_q_heads (", s.num_q_heads,
              ") must be a multiple of num_kv_heads (", s.num_kv_heads, ")");
  TORCH_CHECK(s.block_size > 0, "tree_attention: block_size must be positive");

  check_index_tensor("tree_attention", block_table, "block_table", at::kInt, 2, device);
  check_index_tensor("tree_attention", seq_lens, "seq_lens", at::kInt, 1, device);
  check_index_tensor("tree_attention", query_start_loc, "query_start_loc", at::kInt, 1, device);
  check_index_tensor("tree_attention", req_tree_ids, "req_tree_ids", at::kInt, 1, device);
  check_index_tensor("tree_attention", tree_masks, "tree_masks", at::kLong, 3, device);
  s.num_requests = seq_lens.size(0);
  TORCH_CHECK(block_table.size(0) >= s.num_requests, "tree_attention: block_table has ",
              block_table.size(0), " rows for ", s.num_requests, " requests");
  TORCH_CHECK(query_start_loc.size(0) == s.num_requests + 1,
              "tree_attention: query_start_loc must have num_requests + 1 = ",
              s.num_requests + 1, " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(req_tree_ids.size(0) == s.num_requests, "tree_attention: req_tree_ids must have ",
              s.num_requests, " entries, got ", req_tree_ids.size(0));
  TORCH_CHECK(tree_masks.is_contiguous(), "tree_attention: tree_masks must be contiguous");
  s.q_max = tree_masks.size(1);
  s.mask_words = tree_masks.size(2);
  TORCH_CHECK(tree_masks.size(0) > 0, "tree_attention: tree_masks holds no tree");
  TORCH_CHECK(s.q_max > 0 && s.q_max <= kMaxTreeQueries, "tree_attention: tree_masks rows (Q_MAX = ",
              s.q_max, ") must be in [1, ", kMaxTreeQueries, "]");
  TORCH_CHECK(s.mask_words == (s.q_max + kMaskWordBits - 1) / kMaskWordBits,
              "tree_attention: tree_masks must be [num_trees, Q_MAX, ceil(Q_MAX / 64)] int64, got ",
              tree_masks.sizes());
  TORCH_CHECK(softcap >= 0.0, "tree_attention: softcap must be >= 0 (0 = off), got ", softcap);
  return s;
}

template <typename T>
TreeAttentionParams<T> make_tree_attention_params(
    at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
    const at::Tensor& tree_masks, const at::Tensor& req_tree_ids, const TreeAttentionShape& s,
    double scale, double softcap) {
  TreeAttentionParams<T> p{};
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.kv.k = reinterpret_cast<const T*>(k_cache.data_ptr());
  p.kv.v = reinterpret_cast<const T*>(v_cache.data_ptr());
  p.kv.k_stride_block = k_cache.stride(0);
  p.kv.k_stride_token = k_cache.stride(1);
  p.kv.k_stride_head = k_cache.stride(2);
  p.kv.k_stride_dim = k_cache.stride(3);
  p.kv.v_stride_block = v_cache.stride(0);
  p.kv.v_stride_token = v_cache.stride(1);
  p.kv.v_stride_head = v_cache.stride(2);
  p.kv.v_stride_dim = v_cache.stride(3);
  p.kv.block_table = block_table.data_ptr<int32_t>();
  p.kv.block_table_stride = block_table.stride(0);
  p.kv.block_size = static_cast<int>(s.block_size);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.req_tree_ids = req_tree_ids.data_ptr<int32_t>();
  p.masks.bits = reinterpret_cast<const uint64_t*>(tree_masks.data_ptr<int64_t>());
  p.masks.num_trees = static_cast<int>(tree_masks.size(0));
  p.masks.q_max = static_cast<int>(s.q_max);
  p.masks.words = static_cast<int>(s.mask_words);
  p.num_tokens = static_cast<int>(s.num_tokens);
  p.num_requests = static_cast<int>(s.num_requests);
  p.num_q_heads = static_cast<int>(s.num_q_heads);
  p.num_kv_heads = static_cast<int>(s.num_kv_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  return p;
}

// Checks the move_accepted_kv arguments and fills everything but the layer pointers.
inline MoveAcceptedParams check_move_accepted_args(at::TensorList k_caches,
                                                   at::TensorList v_caches,
                                                   const at::Tensor& slot_mapping,
                                                   const at::Tensor& query_start_loc,
                                                   const at::Tensor& accepted) {
  TORCH_CHECK(!k_caches.empty() && k_caches.size() == v_caches.size(),
              "move_accepted_kv: k_caches and v_caches must be non-empty lists of equal length, got ",
              k_caches.size(), " and ", v_caches.size());
  const at::Tensor& k0 = k_caches[0];
  const at::Tensor& v0 = v_caches[0];
  check_kv_view(k0, "move_accepted_kv: k_caches[0]");
  check_kv_view(v0, "move_accepted_kv: v_caches[0]");
  TORCH_CHECK(k0.sizes() == v0.sizes() && k0.scalar_type() == v0.scalar_type(),
              "move_accepted_kv: K and V views must share shape and dtype, got ", k0.sizes(), " ",
              k0.scalar_type(), " and ", v0.sizes(), " ", v0.scalar_type());
  for (size_t l = 0; l < k_caches.size(); ++l) {
    const at::Tensor& k = k_caches[l];
    const at::Tensor& v = v_caches[l];
    TORCH_CHECK(k.sizes() == k0.sizes() && k.strides() == k0.strides() &&
                    k.scalar_type() == k0.scalar_type() && k.device() == k0.device(),
                "move_accepted_kv: k_caches[", l, "] must match k_caches[0] in shape ",
                k0.sizes(), ", strides ", k0.strides(), ", dtype and device");
    TORCH_CHECK(v.sizes() == v0.sizes() && v.strides() == v0.strides() &&
                    v.scalar_type() == v0.scalar_type() && v.device() == k0.device(),
                "move_accepted_kv: v_caches[", l, "] must match v_caches[0] in shape ",
                v0.sizes(), ", strides ", v0.strides(), ", dtype and device");
  }
  const auto device = k0.device();
  check_index_tensor("move_accepted_kv", slot_mapping, "slot_mapping", at::kLong, 1, device);
  check_index_tensor("move_accepted_kv", query_start_loc, "query_start_loc", at::kInt, 1, device);
  check_index_tensor("move_accepted_kv", accepted, "accepted", at::kInt, 2, device);
  TORCH_CHECK(query_start_loc.size(0) == accepted.size(0) + 1,
              "move_accepted_kv: query_start_loc must have num_requests + 1 = ", accepted.size(0) + 1,
              " entries (accepted is [num_requests, A]), got ", query_start_loc.size(0));

  const int64_t elem = k0.element_size();
  MoveAcceptedParams p{};
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.accepted = accepted.data_ptr<int32_t>();
  p.accepted_stride = accepted.size(0) > 0 ? accepted.stride(0) : 0;
  p.num_accepted_cols = static_cast<int>(accepted.size(1));
  p.num_requests = static_cast<int>(accepted.size(0));
  p.block_size = static_cast<int>(k0.size(1));
  p.num_kv_heads = static_cast<int>(k0.size(2));
  p.head_dim = static_cast<int>(k0.size(3));
  p.elem_bytes = static_cast<int>(elem);
  p.head_bytes = k0.size(3) * elem;
  p.k_stride_block = k0.stride(0) * elem;
  p.k_stride_token = k0.stride(1) * elem;
  p.k_stride_head = k0.stride(2) * elem;
  p.k_stride_dim = k0.stride(3) * elem;
  p.v_stride_block = v0.stride(0) * elem;
  p.v_stride_token = v0.stride(1) * elem;
  p.v_stride_head = v0.stride(2) * elem;
  p.v_stride_dim = v0.stride(3) * elem;
  return p;
}

// keyed_uniforms(keys [B, 2] int64 (seed, counter), n >= 0) -> [B, n] float32.
inline void check_keyed_uniforms_args(const at::Tensor& keys, int64_t n) {
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2,
              "keyed_uniforms: keys must be [B, 2] (seed, counter), got shape ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == at::kLong, "keyed_uniforms: keys must be int64, got ",
              keys.scalar_type());
  TORCH_CHECK(keys.size(0) == 0 || keys.stride(1) == 1,
              "keyed_uniforms: keys must be contiguous in their last dimension, got strides ",
              keys.strides());
  TORCH_CHECK(n >= 0, "keyed_uniforms: n must be >= 0, got ", n);
}

// target_probs(logits [M, V] float32/bfloat16/float16, temperature [M] float32 (> 0),
//              top_k [M] int32 (<= 0 or >= V: off) or none, top_p [M] float32 (>= 1: off) or none,
//              min_p [M] float32 (<= 0: off) or none) -> [M, V] float32.
inline void check_target_probs_args(const at::Tensor& logits, const at::Tensor& temperature,
                                    const c10::optional<at::Tensor>& top_k,
                                    const c10::optional<at::Tensor>& top_p,
                                    const c10::optional<at::Tensor>& min_p) {
  TORCH_CHECK(logits.dim() == 2, "target_probs: logits must be [M, V], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "target_probs: logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) <= 1 || logits.stride(1) == 1,
              "target_probs: logits must be contiguous in the vocabulary dimension, got strides ",
              logits.strides());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, "target_probs: the vocabulary is empty");
  const int64_t m = logits.size(0);
  auto check_row_param = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == m, "target_probs: ", name, " must be [M] = [", m,
                "], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == want, "target_probs: ", name, " must be ", want, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == logits.device(), "target_probs: ", name, " must be on ",
                logits.device(), " like logits, got ", t.device());
  };
  check_row_param(temperature, "temperature", at::kFloat);
  if (top_k.has_value()) check_row_param(*top_k, "top_k", at::kInt);
  if (top_p.has_value()) check_row_param(*top_p, "top_p", at::kFloat);
  if (min_p.has_value()) check_row_param(*min_p, "min_p", at::kFloat);
}

// The per-row parameters of a checked target_probs call, contiguous (undefined: off).
struct TargetProbsParams {
  at::Tensor temperature, top_k, top_p, min_p;
  TargetProbsParams(const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p)
      : temperature(temperature.contiguous()),
        top_k(top_k.has_value() ? top_k->contiguous() : at::Tensor()),
        top_p(top_p.has_value() ? top_p->contiguous() : at::Tensor()),
        min_p(min_p.has_value() ? min_p->contiguous() : at::Tensor()) {}
  const float* temperature_ptr() const { return temperature.data_ptr<float>(); }
  const int32_t* top_k_ptr() const { return top_k.defined() ? top_k.data_ptr<int32_t>() : nullptr; }
  const float* top_p_ptr() const { return top_p.defined() ? top_p.data_ptr<float>() : nullptr; }
  const float* min_p_ptr() const { return min_p.defined() ? min_p.data_ptr<float>() : nullptr; }
};

// rejection_walk(logits [R, V] float32/bfloat16/float16 (rows contiguous in V),
//                row_of_node [B, Q] int64 (-1: none; read as row 0), children [B, Q, C] int64
//                (-1: none; C <= kMaxChildren), drafts [B, Q-1] int64, valid [B, Q] bool,
//                temperature [B] float32, top_k [B] int32 / top_p [B] float32 / min_p [B] float32
//                (each optional, off as in target_probs), accept_u [B, L, C] float32, final_u [B] float32)
//   -> (accepted [B, L-1] int64, last_node [B] int64, final [B] int64)
inline void check_rejection_walk_args(const at::Tensor& logits, const at::Tensor& row_of_node,
                                      const at::Tensor& children, const at::Tensor& drafts,
                                      const at::Tensor& valid, const at::Tensor& temperature,
                                      const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                                      const c10::optional<at::Tensor>& min_p, const at::Tensor& accept_u,
                                      const at::Tensor& final_u, int64_t max_children) {
  TORCH_CHECK(logits.dim() == 2, "rejection_walk: logits must be [R, V], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "rejection_walk: logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.size(0) > 0 && logits.size(1) > 0, "rejection_walk: logits must have rows and a vocabulary, got ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "rejection_walk: logits must be contiguous in the vocabulary dimension, got strides ", logits.strides());
  TORCH_CHECK(row_of_node.dim() == 2, "rejection_walk: row_of_node must be [B, Q], got shape ", row_of_node.sizes());
  const int64_t b = row_of_node.size(0), q = row_of_node.size(1);
  TORCH_CHECK(q >= 1, "rejection_walk: row_of_node needs the root slot, got shape ", row_of_node.sizes());
  TORCH_CHECK(children.dim() == 3 && children.size(0) == b && children.size(1) == q,
              "rejection_walk: children must be [B, Q, C] = [", b, ", ", q, ", C], got shape ", children.sizes());
  const int64_t c = children.size(2);
  TORCH_CHECK(c >= 1 && c <= max_children, "rejection_walk: children per node must be 1..", max_children,
              ", got ", c);
  TORCH_CHECK(drafts.dim() == 2 && drafts.size(0) == b && drafts.size(1) == q - 1,
              "rejection_walk: drafts must be [B, Q-1] = [", b, ", ", q - 1, "], got shape ", drafts.sizes());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == b && valid.size(1) == q,
              "rejection_walk: valid must be [B, Q] = [", b, ", ", q, "], got shape ", valid.sizes());
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == b,
              "rejection_walk: temperature must be [B] = [", b, "], got shape ", temperature.sizes());
  TORCH_CHECK(accept_u.dim() == 3 && accept_u.size(0) == b && accept_u.size(1) >= 1 && accept_u.size(2) == c,
              "rejection_walk: accept_u must be [B, L, C] = [", b, ", L, ", c, "], got shape ", accept_u.sizes());
  TORCH_CHECK(final_u.dim() == 1 && final_u.size(0) == b,
              "rejection_walk: final_u must be [B] = [", b, "], got shape ", final_u.sizes());
  const struct {
    const at::Tensor* t;
    const char* name;
    at::ScalarType want;
  } args[] = {{&row_of_node, "row_of_node", at::kLong}, {&children, "children", at::kLong},
              {&drafts, "drafts", at::kLong},           {&valid, "valid", at::kBool},
              {&temperature, "temperature", at::kFloat}, {&accept_u, "accept_u", at::kFloat},
              {&final_u, "final_u", at::kFloat}};
  for (const auto& a : args) {
    TORCH_CHECK(a.t->scalar_type() == a.want, "rejection_walk: ", a.name, " must be ", a.want, ", got ",
                a.t->scalar_type());
    TORCH_CHECK(a.t->device() == logits.device(), "rejection_walk: ", a.name, " must be on ", logits.device(),
                " like logits, got ", a.t->device());
  }
  const struct {
    const c10::optional<at::Tensor>* t;
    const char* name;
    at::ScalarType want;
  } filters[] = {{&top_k, "top_k", at::kInt}, {&top_p, "top_p", at::kFloat}, {&min_p, "min_p", at::kFloat}};
  for (const auto& f : filters) {
    if (!f.t->has_value()) continue;
    const at::Tensor& t = **f.t;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == b, "rejection_walk: ", f.name, " must be [B] = [", b, "], got shape ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == f.want && t.device() == logits.device(), "rejection_walk: ", f.name,
                " must be ", f.want, " on ", logits.device(), ", got ", t.scalar_type(), " on ", t.device());
  }
}

// The inputs of a checked rejection_walk call, contiguous; the outputs allocated (accepted -1).
struct RejectionWalkArgs {
  at::Tensor row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p, accept_u, final_u;
  at::Tensor accepted, last_node, final_token;
  int64_t batch, slots, width, levels;
  RejectionWalkArgs(const at::Tensor& row_of_node, const at::Tensor& children, const at::Tensor& drafts,
                    const at::Tensor& valid, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
                    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p,
                    const at::Tensor& accept_u, const at::Tensor& final_u)
      : row_of_node(row_of_node.contiguous()),
        children(children.contiguous()),
        drafts(drafts.contiguous()),
        valid(valid.contiguous()),
        temperature(temperature.contiguous()),
        top_k(top_k.has_value() ? top_k->contiguous() : at::Tensor()),
        top_p(top_p.has_value() ? top_p->contiguous() : at::Tensor()),
        min_p(min_p.has_value() ? min_p->contiguous() : at::Tensor()),
        accept_u(accept_u.contiguous()),
        final_u(final_u.contiguous()),
        batch(row_of_node.size(0)),
        slots(row_of_node.size(1)),
        width(children.size(2)),
        levels(accept_u.size(1)) {
    accepted = at::full({batch, levels - 1}, -1, row_of_node.options());
    last_node = at::empty({batch}, row_of_node.options());
    final_token = at::empty({batch}, row_of_node.options());
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {accepted, last_node, final_token}; }
};

// The kernels' parameters of a checked rejection_walk call (its logits, its RejectionWalkArgs).
inline WalkParams make_walk_params(const at::Tensor& logits, const RejectionWalkArgs& a) {
  return WalkParams{a.row_of_node.data_ptr<int64_t>(), a.children.data_ptr<int64_t>(), a.drafts.data_ptr<int64_t>(),
                    a.valid.data_ptr<bool>(), a.temperature.data_ptr<float>(),
                    a.top_k.defined() ? a.top_k.data_ptr<int32_t>() : nullptr,
                    a.top_p.defined() ? a.top_p.data_ptr<float>() : nullptr,
                    a.min_p.defined() ? a.min_p.data_ptr<float>() : nullptr, a.accept_u.data_ptr<float>(),
                    a.final_u.data_ptr<float>(), a.accepted.data_ptr<int64_t>(), a.last_node.data_ptr<int64_t>(),
                    a.final_token.data_ptr<int64_t>(), logits.size(0), logits.size(1), logits.stride(0), a.slots,
                    static_cast<int>(a.width), static_cast<int>(a.levels),
                    std::ldexp(1.f, mass_scale_log2(logits.size(1)))};
}

}  // namespace medusa_vllm
