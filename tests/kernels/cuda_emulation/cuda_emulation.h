// CPU emulation of the CUDA built-ins and of csrc/cuda_utils.cuh's PTX helpers, so the real
// kernel sources (csrc/*.cuh) run on a machine without a GPU. Test-only.
//
// Every CUDA thread of a block is a fiber (emulator.cpp runs them round-robin on one OS
// thread); __syncthreads and the warp collectives (ldmatrix, mma, shfl) are barriers over the
// block / warp. cp.async copies are queued per thread and land only at cp.async.wait_group,
// so a read of a stage before its wait (or without the barrier after it) sees stale data.
// ldmatrix and mma.m16n8k16 assemble their operands from the 32 lanes exactly as the PTX ISA
// fragment layouts say (see the table in csrc/cuda_utils.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#undef __align__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// Operand exchange of one warp's collectives.
struct WarpExchange {
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  float f[32];
  uint64_t u[32];
};

void block_sync();
void warp_sync();
WarpExchange& warp_exchange();
void cp_async(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void check_global_read(const void* ptr, size_t bytes);  // aborts outside registered tensors
void check_shared(const void* ptr, size_t bytes, size_t align);

}  // namespace emu

extern emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::max;
using std::min;

#define __syncthreads() ::emu::block_sync()

inline float __shfl_sync(unsigned /*mask*/, float value, int src_lane) {
  emu::WarpExchange& ex = emu::warp_exchange();
  const int lane = threadIdx.x % 32;
  ex.f[lane] = value;
  emu::warp_sync();
  const float other = ex.f[src_lane & 31];
  emu::warp_sync();
  return other;
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  return __shfl_sync(mask, value, (threadIdx.x % 32) ^ lane_mask);
}

// Integer shuffles (target_probs: 32- and 64-bit sums and scans).
template <typename T>
inline T shfl_int(T value, int src_lane) {
  emu::WarpExchange& ex = emu::warp_exchange();
  const int lane = threadIdx.x % 32;
  ex.u[lane] = static_cast<uint64_t>(value);
  emu::warp_sync();
  const T other = static_cast<T>(ex.u[src_lane & 31]);
  emu::warp_sync();
  return other;
}
inline unsigned __shfl_sync(unsigned, unsigned value, int src_lane) { return shfl_int(value, src_lane); }
inline unsigned long long __shfl_sync(unsigned, unsigned long long value, int src_lane) {
  return shfl_int(value, src_lane);
}
inline unsigned long long __shfl_xor_sync(unsigned, unsigned long long value, int lane_mask) {
  return shfl_int(value, (threadIdx.x % 32) ^ lane_mask);
}
// A lane below delta keeps its own value, as on the GPU.
template <typename T>
inline T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int lane = threadIdx.x % 32;
  const T other = shfl_int(value, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
  return other;
}

// Fibers switch only at barriers: a read-modify-write is atomic here.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  emu::check_shared(address, sizeof(unsigned), sizeof(unsigned));
  const unsigned old = *address;
  *address = old + value;
  return old;
}

// Bit i set when lane i's predicate holds (every lane of the warp takes part).
inline unsigned __ballot_sync(unsigned /*mask*/, bool predicate) {
  emu::WarpExchange& ex = emu::warp_exchange();
  const int lane = threadIdx.x % 32;
  ex.f[lane] = predicate ? 1.f : 0.f;
  emu::warp_sync();
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i)
    if (ex.f[i] != 0.f) bits |= 1u << i;
  emu::warp_sync();
  return bits;
}

inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }

template <typename T>
inline T __ldg(const T* ptr) {
  emu::check_global_read(ptr, sizeof(T));
  return *ptr;
}

inline float __log2f(float x) { return std::log2(x); }

namespace emu {

template <typename T>
inline float b16_to_float(uint32_t bits);
template <>
inline float b16_to_float<__nv_bfloat16>(uint32_t bits) {
  const uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <>
inline float b16_to_float<__half>(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

inline uint16_t load_b16(const void* row, int col) { return static_cast<const uint16_t*>(row)[col]; }

// ldmatrix.m8n8.x4(.trans).b16: lanes 8i..8i+7 address the rows of matrix i.
inline void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {
  WarpExchange& ex = warp_exchange();
  const int lane = threadIdx.x % 32;
  check_shared(smem, 16, 16);
  ex.ptr[lane] = smem;
  warp_sync();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    uint32_t lo, hi;
    if (!trans) {  // (row g, cols 2t, 2t+1)
      lo = load_b16(ex.ptr[8 * i + g], 2 * t);
      hi = load_b16(ex.ptr[8 * i + g], 2 * t + 1);
    } else {  // (rows 2t, 2t+1, col g)
      lo = load_b16(ex.ptr[8 * i + 2 * t], g);
      hi = load_b16(ex.ptr[8 * i + 2 * t + 1], g);
    }
    r[i] = lo | (hi << 16);
  }
  warp_sync();
}

// mma.m16n8k16.row.col.f32.{bf16,f16}: d = A B + c over the whole warp.
template <typename T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpExchange& ex = warp_exchange();
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    ex.a[lane][i] = a[i];
    ex.c[lane][i] = d[i];
  }
  ex.b[lane][0] = b0;
  ex.b[lane][1] = b1;
  warp_sync();
  const auto A = [&](int row, int k) {  // a0:(g,k<8) a1:(g+8,k<8) a2:(g,k>=8) a3:(g+8,k>=8)
    const uint32_t reg = ex.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
    return b16_to_float<T>((reg >> (16 * (k % 2))) & 0xffffu);
  };
  const auto B = [&](int k, int n) {  // b0:(k<8, n) b1:(k>=8, n)
    const uint32_t reg = ex.b[n * 4 + (k % 8) / 2][k >= 8];
    return b16_to_float<T>((reg >> (16 * (k % 2))) & 0xffffu);
  };
  float out[4];
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0);
    const int col = 2 * t + (i & 1);
    float acc = ex.c[lane][i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  warp_sync();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu

namespace medusa_vllm {
namespace cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

inline void cp_async_16(void* smem, const void* gmem, bool valid) { emu::cp_async(smem, gmem, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_async_wait(kPending);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu::ldmatrix(r, smem, true); }
inline float fast_exp2(float x) { return std::exp2(x); }

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::mma<__nv_bfloat16>(d, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
  }
  static __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct MmaOps<__half> {
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::mma<__half>(d, a, b0, b1);
  }
  static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
  }
  static __half from_float(float x) { return __float2half_rn(x); }
};

}  // namespace cuda
}  // namespace medusa_vllm
