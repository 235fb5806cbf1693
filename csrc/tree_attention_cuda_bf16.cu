// Instantiation of the tree_attention CUDA kernels for __nv_bfloat16 (one file per dtype so that nvcc
// compiles them in parallel).
#include "tree_attention_cuda_launch.cuh"

namespace medusa_vllm {
namespace cuda {

template void run_tree_attention<__nv_bfloat16>(const TreeAttentionParams<__nv_bfloat16>& p, int q_max,
                                           int64_t max_context, int64_t num_splits,
                                           const at::Tensor& like);

}  // namespace cuda
}  // namespace medusa_vllm
