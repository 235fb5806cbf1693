// CUDA host function and kernel of target_probs: one 1024-thread block per row; the passes of
// target_probs.h, each a sweep over the row (L2-resident), no sort, no host sync.
//
// Histograms: a thread takes 8 consecutive tokens a sweep and adds runs of one byte value at
// once (a row's keys share a few top-byte values: one bin per power of two of |x|); warps spread
// over 4 sub-histograms; 32-bit shared atomics (add_weight). Integer sums: the result does not
// depend on the atomics' order. Float sums (the kept mass) are fixed-order trees.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>

#include "host_checks.h"
#include "ops.h"
#include "target_probs.h"

namespace medusa_vllm {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 8;  // consecutive tokens a thread takes per sweep step
constexpr int kSubHists = 4;
constexpr unsigned kFull = 0xFFFFFFFFu;
static_assert(kWarps == 32, "block_reduce: one warp reduces the warps' partials");

struct Shared {
  unsigned hist_lo[kSubHists][256];  // a bin's weight: hi * 2^32 + lo (add_weight)
  unsigned hist_hi[kSubHists][256];
  float fred[kWarps];
  unsigned long long ured[kWarps];
  unsigned long long above;
  uint32_t prefix;
};

template <typename T>
struct Row {
  const T* logits;
  int64_t vocab;
  float temperature;
  __device__ __forceinline__ float x(int64_t i) const { return static_cast<float>(logits[i]) / temperature; }
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

// A block-wide reduction in a fixed order (the same shuffle tree every call: the same float on
// every run); `slots` holds the warps' partials.
template <typename V, typename Op>
__device__ V block_reduce(V v, V* slots, Op op) {
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = slots[threadIdx.x];  // kWarps == 32
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
    if (threadIdx.x == 0) slots[0] = v;
  }
  __syncthreads();
  v = slots[0];
  __syncthreads();
  return v;
}

// A 64-bit weight added to a bin as two 32-bit shared atomics, the low half's wrap-around carried
// into the high half (exact: each add wraps at most once). A 64-bit shared atomicAdd is a
// compare-and-swap loop, slow when a row's tokens pile into a few bins (code 084ea7f: about
// 240 µs a row on an H100 whatever the number of rows).
__device__ __forceinline__ void add_weight(unsigned* lo, unsigned* hi, unsigned long long w) {
  const unsigned l = static_cast<unsigned>(w);
  unsigned h = static_cast<unsigned>(w >> 32);
  if (l != 0) {
    const unsigned old = atomicAdd(lo, l);
    h += (old + l < old) ? 1u : 0u;
  }
  if (h != 0) atomicAdd(hi, h);
}

// hist[byte] = weight of the tokens whose key matches prefix under mask, by the byte at shift.
template <typename T, typename Weight>
__device__ void hist_pass(const Row<T>& row, Shared& sh, uint32_t prefix, uint32_t mask, int shift, Weight weight) {
  for (int j = threadIdx.x; j < kSubHists * 256; j += kThreads) {
    (&sh.hist_lo[0][0])[j] = 0;
    (&sh.hist_hi[0][0])[j] = 0;
  }
  __syncthreads();
  unsigned* lo = sh.hist_lo[(threadIdx.x / 32) % kSubHists];
  unsigned* hi = sh.hist_hi[(threadIdx.x / 32) % kSubHists];
  for (int64_t base = int64_t{threadIdx.x} * kPerThread; base < row.vocab; base += int64_t{kThreads} * kPerThread) {
    const int64_t end = base + kPerThread < row.vocab ? base + kPerThread : row.vocab;
    int run_byte = 0;
    unsigned long long run = 0;
    for (int64_t i = base; i < end; ++i) {
      const float x = row.x(i);
      const uint32_t key = order_key(x);
      if ((key & mask) != prefix) continue;
      const unsigned long long w = weight(x, key);
      if (w == 0) continue;
      const int byte = static_cast<int>((key >> shift) & 0xFFu);
      if (run != 0 && byte != run_byte) {
        add_weight(&lo[run_byte], &hi[run_byte], run);
        run = 0;
      }
      run_byte = byte;
      run += w;
    }
    if (run != 0) add_weight(&lo[run_byte], &hi[run_byte], run);
  }
  __syncthreads();
}

// select_byte (target_probs.h) over the summed sub-histograms, by warp 0: lane l takes the
// bytes 255 - 8l down to 248 - 8l, a warp scan finds the lane where the target is reached.
__device__ void select_pass(Shared& sh, unsigned long long target, int shift) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned long long bins[8];
    unsigned long long s = 0;
    for (int j = 0; j < 8; ++j) {
      const int d = 255 - 8 * lane - j;
      unsigned long long h = 0;
      for (int sub = 0; sub < kSubHists; ++sub)
        h += (static_cast<unsigned long long>(sh.hist_hi[sub][d]) << 32) + sh.hist_lo[sub][d];
      bins[j] = h;
      s += h;
    }
    unsigned long long incl = s;
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned long long v = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += v;
    }
    const unsigned long long above = sh.above;
    const unsigned reach = __ballot_sync(kFull, above + incl >= target);
    const int first = reach ? __ffs(reach) - 1 : 31;
    if (lane == first) {
      unsigned long long cum = above + incl - s;
      int byte = 0;
      for (int j = 0; j < 8; ++j) {
        if (cum + bins[j] >= target) {
          byte = 255 - 8 * lane - j;
          break;
        }
        cum += bins[j];
      }
      sh.above = cum;
      sh.prefix |= static_cast<uint32_t>(byte) << shift;
    }
  }
  __syncthreads();
}

// The largest key t with weight(keys >= t) >= target (4 byte passes).
template <typename T, typename Weight>
__device__ uint32_t radix_select(const Row<T>& row, Shared& sh, unsigned long long target, Weight weight) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above = 0;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    hist_pass(row, sh, sh.prefix, mask, shift, weight);
    select_pass(sh, target, shift);
    mask |= 0xFFu << shift;
  }
  const uint32_t t = sh.prefix;
  __syncthreads();  // everyone has it before a next select resets it
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    target_probs_kernel(const T* __restrict__ logits, int64_t row_stride, float* __restrict__ out, int64_t vocab,
                        const float* __restrict__ temperature, const int32_t* __restrict__ top_k,
                        const float* __restrict__ top_p, const float* __restrict__ min_p, float mass_scale) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const Row<T> row{logits + r * row_stride, vocab, temperature[r]};
  float* o = out + r * vocab;
  const int64_t k = top_k ? top_k[r] : vocab;
  const float p = top_p ? top_p[r] : 1.f;
  const float mp = min_p ? min_p[r] : 0.f;

  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) m = fmaxf(m, row.x(i));
  m = block_reduce(m, sh.fred, MaxOp());
  if (m == -INFINITY) {  // nothing to sample (softmax gives NaN too)
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) o[i] = NAN;
    return;
  }
  uint32_t tk = 0, tp = 0;  // thresholds on the key (0: keep all)
  if (k > 0 && k < vocab)
    tk = radix_select(row, sh, static_cast<unsigned long long>(k), [](float, uint32_t) { return 1ull; });
  auto kept_e = [&](float x, uint32_t key) {  // e, or 0 where min-p, top-k or top-p drops the token
    const float e = expf(x - m);
    return ((mp > 0.f && e < mp) || key < tk || key < tp) ? 0.f : e;
  };
  if (p < 1.f) {
    unsigned long long total = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float x = row.x(i);
      total += fixed_mass(kept_e(x, order_key(x)), mass_scale);
    }
    total = block_reduce(total, sh.ured, SumOp());
    tp = radix_select(row, sh, top_p_target(p, total),
                      [&](float x, uint32_t key) { return fixed_mass(kept_e(x, key), mass_scale); });
  }
  float z = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = row.x(i);
    z += kept_e(x, order_key(x));
  }
  const float inv = 1.f / block_reduce(z, sh.fred, SumOp());
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = row.x(i);
    o[i] = kept_e(x, order_key(x)) * inv;
  }
}

}  // namespace

at::Tensor target_probs_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                             const c10::optional<at::Tensor>& top_k, const c10::optional<at::Tensor>& top_p,
                             const c10::optional<at::Tensor>& min_p) {
  check_target_probs_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.is_cuda(), "target_probs_cuda: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows, vocab}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const TargetProbsParams params(temperature, top_k, top_p, min_p);
  const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "target_probs_cuda", [&] {
    target_probs_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<float>(), vocab, params.temperature_ptr(),
        params.top_k_ptr(), params.top_p_ptr(), params.min_p_ptr(), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace medusa_vllm
