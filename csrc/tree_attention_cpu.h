// CPU core of tree_attention: one task per (request, kv head).
//
// All `group` query heads of the kv head are processed together as rows (token-major:
// row r = token r / group, head kv_head * group + r % group), so each K/V tile is gathered from
// the paged cache and converted to fp32 once. Per tile of kKeyTile keys:
//   S = Q K^T            fp32 GEMM (ATen's runtime-dispatched BLAS)
//   softcap, tree mask on window keys, online softmax (running max / sum per row)
//   O = alpha O + P V    fp32 GEMM
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "paged_kv.h"

namespace medusa_vllm {
namespace cpu {

// Keys per tile: vLLM's CPU block size, large enough to amortize the GEMM calls.
constexpr int kKeyTile = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-task scratch, reused across the tasks a thread runs.
struct TreeAttentionScratch {
  std::vector<float> q;  // [rows, D] queries, pre-scaled unless softcap is on
  std::vector<float> o;  // [rows, D] unnormalized output accumulator
  std::vector<float> m;  // [rows] running max of logits
  std::vector<float> l;  // [rows] running sum of exp(logit - m)
  std::vector<float> k;  // [kKeyTile, D] K tile
  std::vector<float> v;  // [kKeyTile, D] V tile
  std::vector<float> s;  // [rows, kKeyTile] logits, then probabilities

  void resize(int rows, int head_dim) {
    q.resize(static_cast<size_t>(rows) * head_dim);
    o.assign(static_cast<size_t>(rows) * head_dim, 0.f);
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    k.resize(static_cast<size_t>(kKeyTile) * head_dim);
    v.resize(static_cast<size_t>(kKeyTile) * head_dim);
    s.resize(static_cast<size_t>(rows) * kKeyTile);
  }
};

// Row-major fp32 matrix [rows, cols] over a scratch buffer, as an ATen tensor for the GEMMs.
inline at::Tensor matrix(float* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// count tokens x head_dim elements of one block -> dst [count, head_dim] fp32, reading along
// the unit-stride direction (head_dim in NHD views, tokens in CPU_ATTN's transposed K).
template <typename T>
void copy_block_rows(const T* src, int64_t stride_token, int64_t stride_dim, int count, int head_dim,
                     float* dst) {
  if (stride_dim != 1 && stride_token == 1) {
    for (int d = 0; d < head_dim; ++d)
      for (int t = 0; t < count; ++t) dst[t * head_dim + d] = static_cast<float>(src[d * stride_dim + t]);
    return;
  }
  for (int t = 0; t < count; ++t)
    for (int d = 0; d < head_dim; ++d)
      dst[t * head_dim + d] = static_cast<float>(src[t * stride_token + d * stride_dim]);
}

// Gathers keys [key0, key0 + nk) of (request, kv_head) into scratch.k / scratch.v as fp32,
// one run of consecutive positions inside a block at a time.
template <typename T>
void gather_kv_tile(const PagedKV<const T>& kv, int request, int kv_head, int key0, int nk,
                    int head_dim, TreeAttentionScratch& sc) {
  for (int j = 0; j < nk;) {
    const int pos = key0 + j;
    const int64_t block = kv.block_of(request, pos);
    const int offset = pos % kv.block_size;
    const int run = std::min(nk - j, kv.block_size - offset);
    copy_block_rows(kv.k + kv.k_offset(block, offset, kv_head), kv.k_stride_token, kv.k_stride_dim, run,
                    head_dim, sc.k.data() + static_cast<size_t>(j) * head_dim);
    copy_block_rows(kv.v + kv.v_offset(block, offset, kv_head), kv.v_stride_token, kv.v_stride_dim, run,
                    head_dim, sc.v.data() + static_cast<size_t>(j) * head_dim);
    j += run;
  }
}

// Independent partial results of the row reductions below, so the compiler vectorizes them
// without reassociating a single float accumulator.
constexpr int kLanes = 8;

inline float row_max(const float* s, int n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, kNegInf);
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) lanes[u] = s[j + u] > lanes[u] ? s[j + u] : lanes[u];
  float m = kNegInf;
  for (; j < n; ++j) m = std::max(m, s[j]);
  for (int u = 0; u < kLanes; ++u) m = std::max(m, lanes[u]);
  return m;
}

// s[j] = exp(s[j] - shift) for j < n (exp of -inf is 0); returns the sum. Cephes-style expf:
// Cody-Waite reduction by ln 2 and a degree-7 polynomial (~1 ulp), written as straight-line
// float/int lane arithmetic that auto-vectorizes (std::exp would not).
inline float exp_shifted_sum(float* s, int n, float shift) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kMinArg = -87.3f;           // below: result 0 (also catches -inf)
  constexpr float kRound = 12582912.f;        // 1.5 * 2^23: adding it rounds to an integer
  for (int j = 0; j < n; ++j) {
    const float x = s[j] - shift;             // <= 0
    const float xc = x < kMinArg ? kMinArg : x;
    const float k = (xc * kLog2e + kRound) - kRound;  // round(x / ln 2)
    const float r = (xc - k * kLn2Hi) - k * kLn2Lo;   // |r| <= ln 2 / 2
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    s[j] = x < kMinArg ? 0.f : p * scale;
  }
  float lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) lanes[u] += s[j + u];
  float sum = 0.f;
  for (; j < n; ++j) sum += s[j];
  for (int u = 0; u < kLanes; ++u) sum += lanes[u];
  return sum;
}

// Online-softmax step of one row: s[0, nk) logits (-inf = masked) -> probabilities relative to
// the new running max; returns the factor by which the row's O must be rescaled.
inline float row_softmax_update(float* s, int nk, float& m, float& l) {
  const float m_new = std::max(m, row_max(s, nk));
  if (m_new == kNegInf) {  // nothing visible yet: all probabilities 0, O stays 0
    std::fill(s, s + nk, 0.f);
    return 1.f;
  }
  const float alpha = std::exp(m - m_new);  // 0 when m was -inf
  l = l * alpha + exp_shifted_sum(s, nk, m_new);
  m = m_new;
  return alpha;
}

// Attention of all query heads of `kv_head` for request `b`.
template <typename T>
void tree_attention_task(const TreeAttentionParams<T>& p, int b, int kv_head,
                         TreeAttentionScratch& sc) {
  const int q_start = p.query_start_loc[b];
  const int q_len = p.query_start_loc[b + 1] - q_start;
  if (q_len <= 0) return;
  const int seq_len = p.seq_lens[b];
  const int ctx = seq_len - q_len;
  const int group = p.group();
  const int rows = q_len * group;
  const int D = p.head_dim;
  const int tree = p.req_tree_ids[b];
  // With softcap the scale goes inside tanh; otherwise it is folded into q.
  const bool use_softcap = p.softcap > 0.f;
  const float q_scale = use_softcap ? 1.f : p.scale;

  sc.resize(rows, D);
  for (int r = 0; r < rows; ++r) {
    const T* q_row = p.q + (q_start + r / group) * p.q_stride_token +
                     (kv_head * group + r % group) * p.q_stride_head;
    float* dst = sc.q.data() + static_cast<size_t>(r) * D;
    for (int d = 0; d < D; ++d) dst[d] = static_cast<float>(q_row[d]) * q_scale;
  }
  const at::Tensor q_mat = matrix(sc.q.data(), rows, D);
  at::Tensor o_mat = matrix(sc.o.data(), rows, D);

  for (int key0 = 0; key0 < seq_len; key0 += kKeyTile) {
    const int nk = std::min(kKeyTile, seq_len - key0);
    gather_kv_tile(p.kv, b, kv_head, key0, nk, D, sc);
    at::Tensor s_mat = matrix(sc.s.data(), rows, nk);
    at::mm_out(s_mat, q_mat, matrix(sc.k.data(), nk, D).t());  // S = Q K^T  [rows, nk]
    const int first_window_key = std::max(0, ctx - key0);      // tile index of key ctx
    for (int r = 0; r < rows; ++r) {
      float* s = sc.s.data() + static_cast<size_t>(r) * nk;
      if (use_softcap) {
        for (int j = 0; j < nk; ++j) s[j] = p.softcap * std::tanh(s[j] * (p.scale / p.softcap));
      }
      if (first_window_key < nk) {
        const uint64_t* mask_row = p.masks.row(tree, r / group);
        for (int j = first_window_key; j < nk; ++j) {
          if (!TreeMasks::test(mask_row, key0 + j - ctx)) s[j] = kNegInf;
        }
      }
      const float alpha = row_softmax_update(s, nk, sc.m[r], sc.l[r]);
      if (alpha != 1.f) {
        float* o_row = sc.o.data() + static_cast<size_t>(r) * D;
        for (int d = 0; d < D; ++d) o_row[d] *= alpha;
      }
    }
    o_mat.addmm_(s_mat, matrix(sc.v.data(), nk, D));  // O += P V
  }

  // Normalize and store. A row that sees no key at all gets zeros.
  for (int r = 0; r < rows; ++r) {
    T* out_row = p.out + (q_start + r / group) * p.out_stride_token +
                 (kv_head * group + r % group) * p.out_stride_head;
    const float inv_l = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
    const float* o_row = sc.o.data() + static_cast<size_t>(r) * D;
    for (int d = 0; d < D; ++d) out_row[d] = static_cast<T>(o_row[d] * inv_l);
  }
}

}  // namespace cpu
}  // namespace medusa_vllm
