// A trace build of the tree_attention CUDA kernel (bf16): torch.ops.medusa_trace.tree_attention
// (the op's schema) and read_trace / clear_trace over the phase timestamps. Test tool only.
#define MEDUSA_VLLM_KERNEL_TRACE
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include "host_checks.h"
#include "tree_attention_cuda_launch.cuh"

namespace {

using medusa_vllm::cuda::g_kernel_trace;

void trace_tree_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, const at::Tensor& tree_masks,
                          const at::Tensor& req_tree_ids, double scale, double softcap, int64_t num_splits) {
  const auto s = medusa_vllm::check_tree_attention_args(out, q, k_cache, v_cache, block_table, seq_lens,
                                                        query_start_loc, tree_masks, req_tree_ids, softcap);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "trace build: bf16 only");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto p = medusa_vllm::make_tree_attention_params<__nv_bfloat16>(
      out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_masks, req_tree_ids, s, scale, softcap);
  medusa_vllm::cuda::run_tree_attention<__nv_bfloat16>(p, static_cast<int>(s.q_max),
                                                       block_table.size(1) * s.block_size, num_splits, q);
}

at::Tensor read_trace() {
  at::Tensor t = at::empty({medusa_vllm::cuda::kTraceCtas, medusa_vllm::cuda::kTraceSlots}, at::kLong);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(t.data_ptr(), g_kernel_trace, sizeof(g_kernel_trace)));
  return t;
}

void clear_trace() {
  static long long zeros[medusa_vllm::cuda::kTraceCtas][medusa_vllm::cuda::kTraceSlots] = {};
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_kernel_trace, zeros, sizeof(zeros)));
}

}  // namespace

TORCH_LIBRARY(medusa_trace, m) {
  m.def(
      "tree_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, Tensor tree_masks, "
      "Tensor req_tree_ids, float scale, float softcap, int num_splits) -> ()");
  m.def("read_trace", &read_trace);
  m.def("clear_trace", &clear_trace);
}

TORCH_LIBRARY_IMPL(medusa_trace, CUDA, m) { m.impl("tree_attention", &trace_tree_attention); }
