// MEDUSA_VLLM_HD: a function the CPU and CUDA host functions share, inlined on both sides.
#pragma once

#if defined(__CUDACC__)
#define MEDUSA_VLLM_HD __host__ __device__ __forceinline__
#else
#define MEDUSA_VLLM_HD inline
#endif
