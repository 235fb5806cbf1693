// Views shared by the CPU and CUDA kernel cores: the paged KV cache, the packed tree
// masks and the parameters of the two ops. Plain structs over raw pointers + strides
// (FlashInfer's paged_kv_t style); no ATen types, so they compile for host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MEDUSA_HD __host__ __device__ __forceinline__
#else
#define MEDUSA_HD inline
#endif

namespace medusa_vllm {

// Bits per word of a packed tree mask row.
constexpr int kMaskWordBits = 64;
// Largest tree window (query tokens per request) the tree mask format supports:
// at most kMaxMaskWords words of kMaskWordBits bits per row.
constexpr int kMaxMaskWords = 2;
constexpr int kMaxTreeQueries = kMaxMaskWords * kMaskWordBits;  // 128

// Paged KV cache of one layer.
//
// K and V are strided views of logical shape [num_blocks, block_size, num_kv_heads, head_dim]
// with arbitrary strides (the CUDA kernels require unit stride on head_dim). vLLM's layouts:
//   - GPU (NHD):  per-layer tensor [nb, bs, Hkv, 2D]; K = [..., :D], V = [..., D:]
//   - CPU_ATTN "vec"/"vec16" (vLLM 0.26): per (block, kv head) K^T [D, bs] then V [bs, D];
//                 K's head_dim stride is bs.
//   - the row-split view [nb, Hkv, 2bs, D] (K rows [0, bs), V rows [bs, 2bs)) also works.
// Token position p of request b lives in physical block block_table[b, p / block_size] at
// offset p % block_size.
template <typename T>
struct PagedKV {
  T* k;                        // [num_blocks, block_size, num_kv_heads, head_dim] (strided)
  T* v;                        // same shape as k; strides may differ
  int64_t k_stride_block, k_stride_token, k_stride_head, k_stride_dim;
  int64_t v_stride_block, v_stride_token, v_stride_head, v_stride_dim;
  const int32_t* block_table;  // [num_requests, max_blocks]
  int64_t block_table_stride;  // elements between two requests' rows
  int block_size;

  // Physical block of position `pos` of request `b`.
  MEDUSA_HD int64_t block_of(int b, int pos) const {
    return block_table[b * block_table_stride + pos / block_size];
  }
  // Element offsets of (physical block, offset in block, kv head) in K and V.
  MEDUSA_HD int64_t k_offset(int64_t block, int offset, int head) const {
    return block * k_stride_block + offset * k_stride_token + head * k_stride_head;
  }
  MEDUSA_HD int64_t v_offset(int64_t block, int offset, int head) const {
    return block * v_stride_block + offset * v_stride_token + head * v_stride_head;
  }
};

// Packed tree masks: [num_trees, q_max, words] int64. Bit j of row i (bit j % 64 of word
// j / 64) set <=> query token i of the tree window may attend window key j.
struct TreeMasks {
  const uint64_t* bits;  // [num_trees, q_max, words]
  int num_trees;
  int q_max;
  int words;             // ceil(q_max / 64) <= kMaxMaskWords

  MEDUSA_HD const uint64_t* row(int tree, int i) const {
    return bits + (static_cast<int64_t>(tree) * q_max + i) * words;
  }
  MEDUSA_HD static bool test(const uint64_t* row, int j) {
    return (row[j / kMaskWordBits] >> (j % kMaskWordBits)) & 1u;
  }
};

// tree_attention: N query tokens of B requests (concatenated), Hq = Hkv * group heads.
//
// Request b owns query rows [qsl[b], qsl[b+1]) and seq_lens[b] keys; its last q_len keys are
// its own queries' K/V (already in the cache). With ctx = seq_len - q_len, query token i
// attends every key in [0, ctx) and window key ctx + j iff tree bit (i, j) is set.
template <typename T>
struct TreeAttentionParams {
  T* out;                          // [N, Hq, D] (output; strided rows)
  const T* q;                      // [N, Hq, D] (strided rows)
  int64_t q_stride_token, q_stride_head;
  int64_t out_stride_token, out_stride_head;
  PagedKV<const T> kv;
  const int32_t* seq_lens;         // [B]
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* req_tree_ids;     // [B]
  TreeMasks masks;
  int num_tokens;                  // N
  int num_requests;                // B
  int num_q_heads;                 // Hq
  int num_kv_heads;                // Hkv
  int head_dim;                    // D
  float scale;                     // multiplies q . k
  float softcap;                   // 0: off; else logits = softcap * tanh(logits / softcap)

  MEDUSA_HD int group() const { return num_q_heads / num_kv_heads; }
};

// move_accepted_kv: per request b and step k (ascending) copy the K/V entries of window index
// accepted[b, k] to window index k + 1, in every layer. Layer pointers are passed separately
// (a host vector on the CPU, a by-value table on CUDA).
struct MoveAcceptedParams {
  const int64_t* slot_mapping;     // [N] slot = block * block_size + offset; < 0: padding
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* accepted;         // [B, A] window indices, -1 terminated
  int64_t accepted_stride;         // elements between two requests' rows
  int num_accepted_cols;           // A
  int num_requests;                // B
  int block_size;
  int num_kv_heads;
  int head_dim;
  int elem_bytes;
  int64_t head_bytes;              // head_dim * element size
  // Byte strides (all layers share them); *_stride_dim == elem_bytes for contiguous heads.
  int64_t k_stride_block, k_stride_token, k_stride_head, k_stride_dim;
  int64_t v_stride_block, v_stride_token, v_stride_head, v_stride_dim;

  MEDUSA_HD int64_t k_offset(int64_t slot, int head) const {
    return (slot / block_size) * k_stride_block + (slot % block_size) * k_stride_token +
           head * k_stride_head;
  }
  MEDUSA_HD int64_t v_offset(int64_t slot, int head) const {
    return (slot / block_size) * v_stride_block + (slot % block_size) * v_stride_token +
           head * v_stride_head;
  }
};

}  // namespace medusa_vllm
