// The counter-based hash behind keyed_uniforms: uniforms in [0, 1) that are a pure function of
// a (seed, counter) key and the draw's index, the same on every device (no state, no
// generator). Shared by the CPU and CUDA host functions; the PyTorch reference is
// medusa_vllm.kernels.reference.keyed_uniforms_ref (int64 tensor ops, bit for bit the same numbers).
//
//   x = fmix32(fmix32(fmix32(lo32(counter) ^ 0x5BD1E995) ^ hi32(seed)) ^ lo32(seed))
//   u[j] = (fmix32(x + j * 0x9E3779B9 mod 2^32) >> 8) * 2^-24
#pragma once

#include <cstdint>

#include "host_device.h"

namespace medusa_vllm {

// MurmurHash3's 32-bit finalizer (a bijection of [0, 2^32) with full avalanche).
MEDUSA_VLLM_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The per-key state x of a (seed, counter) key.
MEDUSA_VLLM_HD uint32_t keyed_state(int64_t seed, int64_t counter) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t x = fmix32(static_cast<uint32_t>(counter) ^ 0x5BD1E995u);
  x = fmix32(x ^ static_cast<uint32_t>(s >> 32));
  return fmix32(x ^ static_cast<uint32_t>(s));
}

// Draw j of the key whose state is x: a multiple of 2^-24 in [0, 1), exact in float32.
MEDUSA_VLLM_HD float keyed_uniform(uint32_t x, int64_t j) {
  const uint32_t h = fmix32(x + static_cast<uint32_t>(j) * 0x9E3779B9u);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

}  // namespace medusa_vllm
