// Inline-PTX helpers for sm_80+ (also used on sm_90): cp.async, ldmatrix, mma.sync m16n8k16.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), used throughout:
//   A (16x16, row-major), 4 x b32:  a0 = (g, 2t..2t+1)   a1 = (g+8, 2t..)
//                                    a2 = (g, 2t+8..)     a3 = (g+8, 2t+8..)
//   B (16x8, "col"),      2 x b32:  b0 = (k 2t..2t+1, n g)   b1 = (k 2t+8.., n g)
//   C/D (16x8) fp32,      4 floats: c0,c1 = (g, 2t..2t+1)   c2,c3 = (g+8, 2t..2t+1)
// ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of matrix i; register i receives
// matrix i's (row g, cols 2t..2t+1), or with .trans its (rows 2t..2t+1, col g).
#pragma once

#if defined(MEDUSA_VLLM_CUDA_EMULATION)
// CPU emulation of these helpers (and of the CUDA built-ins), used only by the kernel-logic
// tests in tests/kernels/cuda_emulation/; never part of a build of the extension.
#include "cuda_emulation.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace medusa_vllm {
namespace cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy, bypassing L1. valid == false zero-fills the destination
// without reading global memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// 2^x with the hardware approximation; 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per-dtype MMA and packing of two floats into one b32 register (low half = first value).
template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  // d += a * b  (m16n8k16, fp32 accumulate)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

}  // namespace cuda
}  // namespace medusa_vllm

#endif  // MEDUSA_VLLM_CUDA_EMULATION
