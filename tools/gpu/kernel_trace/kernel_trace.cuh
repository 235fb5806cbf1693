// Phase timestamps of the tree_attention kernel (trace builds only: tools/gpu/kernel_trace.py).
// Thread 0 of CTA b writes clock64() at phase `slot` to g_kernel_trace[b][slot]; slot 0 also
// records %globaltimer (29) and %smid (31), slot 28 (the end) %globaltimer (30).
#pragma once

namespace medusa_vllm {
namespace cuda {

constexpr int kTraceCtas = 2048;
constexpr int kTraceSlots = 32;
__device__ long long g_kernel_trace[kTraceCtas][kTraceSlots];

__device__ __forceinline__ long long trace_globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void trace_point(int slot) {
  if (threadIdx.x != 0 || blockIdx.x >= kTraceCtas) return;
  g_kernel_trace[blockIdx.x][slot] = clock64();
  if (slot == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    g_kernel_trace[blockIdx.x][29] = trace_globaltimer();
    g_kernel_trace[blockIdx.x][31] = smid;
  }
  if (slot == 28) g_kernel_trace[blockIdx.x][30] = trace_globaltimer();
}

}  // namespace cuda
}  // namespace medusa_vllm

#define MEDUSA_TRACE(slot) ::medusa_vllm::cuda::trace_point(slot)
