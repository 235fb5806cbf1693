// CUDA host function of tree_attention: checks (metadata only: no host syncs), alignment
// requirements of the 16-byte copies, dtype dispatch. The kernels live in
// tree_attention_cuda.cuh; the per-dtype instantiations in tree_attention_cuda_{bf16,fp16}.cu.
//
// Invalid per-request values (q_len > Q_MAX, seq_len < q_len, tree id out of range) cannot be
// checked here without a sync: the kernel writes NaN rows for such a request instead.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "host_checks.h"
#include "ops.h"

namespace medusa_vllm {
namespace cuda {

template <typename T>
void run_tree_attention(const TreeAttentionParams<T>& p, int q_max, int64_t max_context,
                        int64_t num_splits, const at::Tensor& like);
extern template void run_tree_attention<__nv_bfloat16>(const TreeAttentionParams<__nv_bfloat16>&, int,
                                                       int64_t, int64_t, const at::Tensor&);
extern template void run_tree_attention<__half>(const TreeAttentionParams<__half>&, int, int64_t,
                                                int64_t, const at::Tensor&);

}  // namespace cuda

namespace {

constexpr int64_t kCopyBytes = 16;  // cp.async granularity

void check_copy_alignment(const at::Tensor& t, const char* name, int64_t strided_dims) {
  const int64_t elem = t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kCopyBytes == 0, "tree_attention (CUDA): ",
              name, " must be 16-byte aligned");
  for (int64_t d = 0; d < strided_dims; ++d) {
    TORCH_CHECK((t.stride(d) * elem) % kCopyBytes == 0, "tree_attention (CUDA): ", name,
                " strides must be multiples of 16 bytes, got strides ", t.strides());
  }
}

}  // namespace

void tree_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                         const at::Tensor& tree_masks, const at::Tensor& req_tree_ids,
                         double scale, double softcap, int64_t num_splits) {
  const TreeAttentionShape s = check_tree_attention_args(
      out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_masks, req_tree_ids,
      softcap);
  TORCH_CHECK(q.is_cuda(), "tree_attention_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128,
              "tree_attention (CUDA): head_dim must be 64 or 128, got ", s.head_dim);
  TORCH_CHECK(s.num_tokens < (int64_t{1} << 31) / s.num_q_heads,
              "tree_attention (CUDA): too many query tokens");
  check_unit_head_stride(k_cache, "tree_attention: k_cache");
  check_unit_head_stride(v_cache, "tree_attention: v_cache");
  check_copy_alignment(q, "q", 2);
  check_copy_alignment(out, "out", 2);
  check_copy_alignment(k_cache, "k_cache", 3);
  check_copy_alignment(v_cache, "v_cache", 3);

  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t max_context = block_table.size(1) * s.block_size;
  const auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    const auto p = make_tree_attention_params<T>(out, q, k_cache, v_cache, block_table, seq_lens,
                                                 query_start_loc, tree_masks, req_tree_ids, s,
                                                 scale, softcap);
    cuda::run_tree_attention<T>(p, static_cast<int>(s.q_max), max_context, num_splits, q);
  };
  switch (q.scalar_type()) {
    case at::kBFloat16:
      run(__nv_bfloat16{});
      break;
    case at::kHalf:
      run(__half{});
      break;
    default:
      TORCH_CHECK(false, "tree_attention (CUDA): dtype must be float16 or bfloat16, got ", q.scalar_type());
  }
}

}  // namespace medusa_vllm
