// CPU host function of rejection_walk: a request per task (at::parallel_for), the walk of
// rejection_walk.h in order over each row (checks in host_checks.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "host_checks.h"
#include "ops.h"
#include "rejection_walk.h"
#include "target_probs_cpu.h"

namespace medusa_vllm {
namespace {

// Per-task buffers of a filtered row (target_probs_cpu.h).
struct Scratch {
  std::vector<float> e, x;
  std::vector<uint32_t> keys;
  explicit Scratch(int64_t vocab) : e(vocab), x(vocab), keys(vocab) {}
};

// A row's target: softmax(x / T) by its max and normaliser, the filtered e (kept e_i, 0 where
// a filter drops the token) and their sum, or the point mass at its argmax.
template <typename T>
struct RowTarget {
  const T* logits;
  int64_t vocab;
  float temperature;
  bool greedy;
  bool filtered = false;
  bool empty = false;   // every logit -inf: nothing to sample
  float m = -INFINITY;  // max of x / T (sampled, no filter)
  float z = 0.f;        // sum of exp(x / T - m), or of the kept e
  int64_t argmax = 0;   // (greedy)
  const float* e = nullptr;

  RowTarget(const T* logits, int64_t vocab, float temperature, const RequestFilter& f, Scratch& s)
      : logits(logits), vocab(vocab), temperature(temperature), greedy(temperature <= kGreedyTemperature) {
    if (greedy) {
      float best = -INFINITY;
      for (int64_t i = 0; i < vocab; ++i) {
        const float v = static_cast<float>(logits[i]);
        if (v > best) {
          best = v;
          argmax = i;
        }
      }
      return;
    }
    if (f.any(vocab)) {
      filtered = true;
      const cpu::RowParams rp{temperature, f.top_k > 0 ? f.top_k : vocab, f.top_p, f.min_p};
      z = static_cast<float>(cpu::target_probs_row(logits, s.e.data(), vocab, rp, s.x, s.keys, /*normalize=*/false));
      e = s.e.data();
      empty = !(z > 0.f);
      return;
    }
    for (int64_t i = 0; i < vocab; ++i) m = std::fmax(m, x(i));
    for (int64_t i = 0; i < vocab; ++i) z += std::exp(x(i) - m);
    empty = m == -INFINITY;
  }
  float x(int64_t i) const { return static_cast<float>(logits[i]) / temperature; }
  float prob(int64_t t) const {
    if (greedy) return t == argmax ? 1.f : 0.f;
    return filtered ? e[t] / z : std::exp(x(t) - m) / z;
  }
  uint64_t mass(int64_t i, float scale) const {
    if (greedy) return i == argmax ? fixed_mass(1.f, scale) : 0;
    return fixed_mass(filtered ? e[i] : std::exp(x(i) - m), scale);
  }
};

// The final token at the stopping row: the inverse-CDF draw of rejection_walk.h.
template <typename T>
int64_t draw(const RowTarget<T>& row, const Children& c, float u, float scale) {
  if (row.empty) return 0;
  auto removed = [&](int64_t t) {
    for (int j = 0; j < c.n; ++j)
      if (c.offered[j] && c.token[j] == t) return true;
    return false;
  };
  uint64_t rest = 0, all = 0;
  for (int64_t i = 0; i < row.vocab; ++i) {
    const uint64_t w = row.mass(i, scale);
    all += w;
    rest += removed(i) ? 0 : w;
  }
  const bool use_rest = rest > 0;
  const uint64_t total = use_rest ? rest : all;
  if (total == 0) return row.greedy ? row.argmax : 0;
  const uint64_t x = draw_threshold(u, total);
  uint64_t cum = 0;
  for (int64_t i = 0; i < row.vocab; ++i) {
    if (use_rest && removed(i)) continue;
    cum += row.mass(i, scale);
    if (cum > x) return i;
  }
  return row.vocab - 1;  // not reached: x < total
}

template <typename T>
void walk_request(const T* logits, const WalkParams& p, int64_t b) {
  const int64_t q = p.slots;
  const int64_t* row_of_node = p.row_of_node + b * q;
  const int64_t* children = p.children + b * q * p.width;
  const int64_t* drafts = p.drafts + b * (q - 1);
  const bool* valid = p.valid + b * q;
  const float* accept_u = p.accept_u + b * p.levels * p.width;
  int64_t* accepted = p.accepted + b * (p.levels - 1);
  const RequestFilter filter = request_filter(p, b);
  Scratch scratch(filter.any(p.vocab) ? p.vocab : 0);
  int64_t cur = 0;
  Children c;
  float pr[kMaxChildren];
  for (int level = 0; level < p.levels; ++level) {
    const int64_t r = std::min(std::max<int64_t>(row_of_node[cur], 0), p.rows - 1);
    const RowTarget<T> row(logits + r * p.row_stride, p.vocab, p.temperature[b], filter, scratch);
    load_children(c, children, p.width, cur, drafts, valid);
    for (int j = 0; j < c.n; ++j) pr[j] = c.offered[j] && !row.empty ? row.prob(c.token[j]) : 0.f;
    // (the last level's nodes are leaves: the walk stops there)
    const int j = level + 1 < p.levels ? first_accepted(pr, accept_u + level * p.width, c.n) : -1;
    if (j >= 0) {
      accepted[level] = c.id[j];
      cur = c.id[j];
      continue;
    }
    p.final_token[b] = draw(row, c, p.final_u[b], p.scale);
    break;
  }
  p.last_node[b] = cur;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_walk_cpu(
    const at::Tensor& logits, const at::Tensor& row_of_node, const at::Tensor& children, const at::Tensor& drafts,
    const at::Tensor& valid, const at::Tensor& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, const c10::optional<at::Tensor>& min_p, const at::Tensor& accept_u,
    const at::Tensor& final_u) {
  check_rejection_walk_args(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                            accept_u, final_u, kMaxChildren);
  TORCH_CHECK(logits.device().is_cpu(), "rejection_walk_cpu: logits must be a CPU tensor");
  const RejectionWalkArgs a(row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p, accept_u, final_u);
  const WalkParams p = make_walk_params(logits, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rejection_walk_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, a.batch, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) walk_request(base, p, b);
    });
  });
  return a.outputs();
}

}  // namespace medusa_vllm
