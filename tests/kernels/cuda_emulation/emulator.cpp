// Runs the CUDA kernels of csrc/ (tree_attention_cuda.cuh, move_accepted_kv.cuh,
// target_probs_cuda.cuh, rejection_walk_cuda.cuh) on the CPU
// through cuda_emulation.h, for tests on machines without a GPU. Built on the fly by
// tests/kernels/test_cuda_emulation.py (torch.utils.cpp_extension.load). The launch plans
// mirror csrc/tree_attention_cuda_launch.cuh and csrc/move_accepted_kv_cuda.cu, except that
// the split count is explicit (no SM count here) and the tile config can be forced.
#include <torch/extension.h>
#include <ucontext.h>

#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "host_checks.h"
#include "move_accepted_kv.cuh"
#include "rejection_walk_cuda.cuh"
#include "target_probs_cuda.cuh"
#include "tree_attention_cuda.cuh"

emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace medusa_vllm {
namespace cuda {
constexpr size_t kEmuSmemBytes = 228 * 1024;  // H100 shared memory per SM
__attribute__((aligned(16))) unsigned char smem[kEmuSmemBytes];
}  // namespace cuda
}  // namespace medusa_vllm

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
  std::vector<Copy> open;                   // issued, not yet committed
  std::deque<std::vector<Copy>> committed;  // committed groups, oldest first
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  long generation = 0;
};

struct BlockRuntime {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<WarpExchange> exchange;
  std::function<void()> body;
  long progress = 0;
};

BlockRuntime* g_rt = nullptr;
std::vector<std::pair<const char*, const char*>> g_global_ranges;  // readable global memory
size_t g_smem_bytes = 0;                                           // dynamic smem of the launch

Fiber& me() { return g_rt->fibers[g_rt->current]; }

void yield() { swapcontext(&me().ctx, &g_rt->scheduler); }

void wait_barrier(Barrier& b) {
  const long generation = b.generation;
  ++g_rt->progress;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

void fiber_entry() {
  g_rt->body();
  me().done = true;
  ++g_rt->progress;
}  // returns to uc_link = the scheduler

}  // namespace

void block_sync() { wait_barrier(g_rt->block); }
void warp_sync() { wait_barrier(g_rt->warps[threadIdx.x / 32]); }
WarpExchange& warp_exchange() { return g_rt->exchange[threadIdx.x / 32]; }

void check_global_read(const void* ptr, size_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (const auto& [lo, hi] : g_global_ranges)
    if (p >= lo && p + bytes <= hi) return;
  fprintf(stderr, "emulator: global read of %zu bytes at %p outside every input tensor\n", bytes, ptr);
  abort();
}

void check_shared(const void* ptr, size_t bytes, size_t align) {
  const unsigned char* p = static_cast<const unsigned char*>(ptr);
  const unsigned char* base = medusa_vllm::cuda::smem;
  if (p < base || p + bytes > base + g_smem_bytes || reinterpret_cast<uintptr_t>(p) % align != 0) {
    fprintf(stderr, "emulator: shared access at offset %td (%zu bytes, align %zu) outside [0, %zu) or misaligned\n",
            p - base, bytes, align, g_smem_bytes);
    abort();
  }
}

void cp_async(void* dst, const void* src, bool valid) {
  check_shared(dst, 16, 16);
  if (valid) {
    check_global_read(src, 16);
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      fprintf(stderr, "emulator: misaligned cp.async source %p\n", src);
      abort();
    }
  }
  me().open.push_back({dst, src, valid});
}

void cp_async_commit() {
  me().committed.push_back(std::move(me().open));
  me().open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = me();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const Copy& c : f.committed.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    f.committed.pop_front();
  }
}

// Runs one thread block to completion; aborts on a deadlock (a barrier nobody can pass).
void run_block(Dim3 block, Dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  TORCH_CHECK(threads % 32 == 0, "emulator: block size must be a multiple of 32");
  BlockRuntime rt;
  g_rt = &rt;
  g_smem_bytes = smem_bytes;
  std::memset(medusa_vllm::cuda::smem, 0xff, smem_bytes);  // uninitialized shared memory = NaN
  rt.body = body;
  rt.block.expected = threads;
  rt.warps.resize(threads / 32);
  for (auto& w : rt.warps) w.expected = 32;
  rt.exchange.resize(threads / 32);
  rt.fibers.resize(threads);
  for (auto& f : rt.fibers) {
    f.stack.reset(new char[kStackBytes]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &rt.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  blockIdx = block;
  gridDim = grid;
  blockDim = Dim3{static_cast<unsigned>(threads), 1, 1};
  for (bool all_done = false; !all_done;) {
    const long before = rt.progress;
    all_done = true;
    for (int i = 0; i < threads; ++i) {
      if (rt.fibers[i].done) continue;
      all_done = false;
      rt.current = i;
      threadIdx = Dim3{static_cast<unsigned>(i), 0, 0};
      swapcontext(&rt.scheduler, &rt.fibers[i].ctx);
    }
    if (!all_done && rt.progress == before) {
      fprintf(stderr, "emulator: deadlock in block (%u, %u)\n", block.x, block.y);
      abort();
    }
  }
  g_rt = nullptr;
}

void set_global_ranges(const std::vector<at::Tensor>& tensors) {
  g_global_ranges.clear();
  for (const at::Tensor& t : tensors) {
    const at::Tensor base = t;  // the whole storage of the view is readable
    const char* lo = static_cast<const char*>(base.storage().data());
    g_global_ranges.emplace_back(lo, lo + base.storage().nbytes());
  }
}

}  // namespace emu

namespace medusa_vllm {
namespace cuda {
namespace {

constexpr int kEmulatedSms = 132;  // "auto" tile choice as on an H100

template <typename T, typename Cfg>
void emulate_tree_attention(const TreeAttentionParams<T>& p, int q_max, int num_splits) {
  SplitKV sp = make_split_kv<Cfg>(p, q_max, num_splits);
  at::Tensor partial_o, partial_lse;
  if (num_splits > 1) {  // NaN-filled: a partial the merge reads but nobody wrote shows up
    partial_o = at::full({num_splits, p.num_tokens, p.num_q_heads, p.head_dim}, NAN, at::kFloat);
    partial_lse = at::full({num_splits, p.num_tokens, p.num_q_heads}, NAN, at::kFloat);
    sp.partial_o = partial_o.data_ptr<float>();
    sp.partial_lse = partial_lse.data_ptr<float>();
  }
  const unsigned grid = p.num_requests * p.num_kv_heads * num_splits * sp.row_tiles;
  for (unsigned b = 0; b < grid; ++b) {
    emu::run_block({b, 0, 0}, {grid, 1, 1}, Cfg::kThreads, Cfg::kSmemBytes,
                   [&] { tree_attention_kernel<T, Cfg>(p, sp); });
  }
  if (num_splits > 1) {
    const unsigned rows = p.num_tokens * p.num_q_heads;
    const unsigned merge_grid = (rows + kMergeWarps - 1) / kMergeWarps;
    for (unsigned b = 0; b < merge_grid; ++b) {
      emu::run_block({b, 0, 0}, {merge_grid, 1, 1}, kMergeWarps * 32, 0,
                     [&] { merge_splits_kernel<T, Cfg::kHeadDim>(p, sp); });
    }
  }
}

template <typename T, int kHeadDim>
void emulate_head_dim(const TreeAttentionParams<T>& p, int q_max, int num_splits, const std::string& tile) {
  using Small = typename Configs<kHeadDim>::Small;
  using Large = typename Configs<kHeadDim>::Large;
  const bool large = tile == "auto" ? use_large_tiles<kHeadDim>(max_query_rows(p, q_max), p.num_requests,
                                                                p.num_kv_heads, kEmulatedSms)
                                    : tile == "large";
  if (large) emulate_tree_attention<T, Large>(p, q_max, num_splits);
  else emulate_tree_attention<T, Small>(p, q_max, num_splits);
}

}  // namespace
}  // namespace cuda
}  // namespace medusa_vllm

// Same contract as torch.ops.medusa_vllm.tree_attention on CUDA, for CPU tensors (bf16/fp16).
void tree_attention_emulated(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                             at::Tensor block_table, at::Tensor seq_lens, at::Tensor query_start_loc,
                             at::Tensor tree_masks, at::Tensor req_tree_ids, double scale, double softcap,
                             int64_t num_splits, std::string tile) {
  using namespace medusa_vllm;
  const TreeAttentionShape s = check_tree_attention_args(out, q, k_cache, v_cache, block_table, seq_lens,
                                                         query_start_loc, tree_masks, req_tree_ids, softcap);
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128, "head_dim must be 64 or 128");
  emu::set_global_ranges({q, k_cache, v_cache, block_table, seq_lens, query_start_loc, tree_masks, req_tree_ids});
  const int splits = static_cast<int>(std::max<int64_t>(1, num_splits));
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto p = make_tree_attention_params<T>(out, q, k_cache, v_cache, block_table, seq_lens,
                                                 query_start_loc, tree_masks, req_tree_ids, s, scale, softcap);
    if (p.num_tokens == 0 || p.num_requests == 0) return;
    if (s.head_dim == 64) cuda::emulate_head_dim<T, 64>(p, static_cast<int>(s.q_max), splits, tile);
    else cuda::emulate_head_dim<T, 128>(p, static_cast<int>(s.q_max), splits, tile);
  };
  if (q.scalar_type() == at::kBFloat16) run(__nv_bfloat16{});
  else if (q.scalar_type() == at::kHalf) run(__half{});
  else TORCH_CHECK(false, "emulated tree_attention takes bf16 or fp16");
}

// Same contract as torch.ops.medusa_vllm.move_accepted_kv on CUDA; unit_bytes picks the copy unit.
void move_accepted_kv_emulated(std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                               at::Tensor slot_mapping, at::Tensor query_start_loc, at::Tensor accepted,
                               int64_t unit_bytes) {
  using namespace medusa_vllm;
  const MoveAcceptedParams p = check_move_accepted_args(k_caches, v_caches, slot_mapping, query_start_loc, accepted);
  if (p.num_requests == 0 || p.num_accepted_cols == 0) return;
  TORCH_CHECK(p.head_bytes % unit_bytes == 0, "unit_bytes must divide head bytes");
  const auto launch = [&](auto unit_tag) {
    using Unit = decltype(unit_tag);
    for (size_t first = 0; first < k_caches.size(); first += cuda::kMaxLayersPerLaunch) {
      cuda::LayerTable layers{};
      layers.num_layers = static_cast<int>(std::min<size_t>(cuda::kMaxLayersPerLaunch, k_caches.size() - first));
      for (int l = 0; l < layers.num_layers; ++l) {
        layers.k[l] = static_cast<char*>(k_caches[first + l].data_ptr());
        layers.v[l] = static_cast<char*>(v_caches[first + l].data_ptr());
      }
      const int64_t threads = int64_t{layers.num_layers} * p.num_kv_heads * (p.head_bytes / sizeof(Unit));
      const unsigned gx = static_cast<unsigned>((threads + cuda::kMoveThreads - 1) / cuda::kMoveThreads);
      for (unsigned y = 0; y < static_cast<unsigned>(p.num_requests); ++y)
        for (unsigned x = 0; x < gx; ++x)
          emu::run_block({x, y, 0}, {gx, static_cast<unsigned>(p.num_requests), 1}, cuda::kMoveThreads, 0,
                         [&] { cuda::move_accepted_kv_kernel<Unit>(p, layers); });
    }
  };
  switch (unit_bytes) {
    case 16: launch(uint4{}); break;
    case 4: launch(uint32_t{}); break;
    case 2: launch(uint16_t{}); break;
    case 1: launch(uint8_t{}); break;
    default: TORCH_CHECK(false, "unit_bytes must be 16, 4, 2 or 1");
  }
}

// target_probs_cuda's launch (float32 logits): a block per row.
at::Tensor target_probs_emulated(at::Tensor logits, at::Tensor temperature, c10::optional<at::Tensor> top_k,
                                 c10::optional<at::Tensor> top_p, c10::optional<at::Tensor> min_p) {
  using namespace medusa_vllm;
  check_target_probs_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "the emulation runs float32 logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows, vocab}, logits.options());
  const TargetProbsParams params(temperature, top_k, top_p, min_p);
  std::vector<at::Tensor> inputs{logits, params.temperature};
  for (const at::Tensor& t : {params.top_k, params.top_p, params.min_p})
    if (t.defined()) inputs.push_back(t);
  emu::set_global_ranges(inputs);
  const float scale = std::ldexp(1.f, mass_scale_log2(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    emu::run_block({static_cast<unsigned>(r), 0, 0}, {static_cast<unsigned>(rows), 1, 1}, cuda::kThreads,
                   sizeof(cuda::Shared), [&] {
                     cuda::target_probs_kernel<float>(logits.data_ptr<float>(), logits.stride(0),
                                                      out.data_ptr<float>(), vocab, params.temperature_ptr(),
                                                      params.top_k_ptr(), params.top_p_ptr(), params.min_p_ptr(),
                                                      scale);
                   });
  }
  return out;
}

// rejection_walk_cuda's launch (float32 logits): a block per request.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rejection_walk_emulated(at::Tensor logits, at::Tensor row_of_node,
                                                                       at::Tensor children, at::Tensor drafts,
                                                                       at::Tensor valid, at::Tensor temperature,
                                                                       c10::optional<at::Tensor> top_k,
                                                                       c10::optional<at::Tensor> top_p,
                                                                       c10::optional<at::Tensor> min_p,
                                                                       at::Tensor accept_u, at::Tensor final_u) {
  using namespace medusa_vllm;
  check_rejection_walk_args(logits, row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p,
                            accept_u, final_u, kMaxChildren);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "the emulation runs float32 logits");
  const RejectionWalkArgs a(row_of_node, children, drafts, valid, temperature, top_k, top_p, min_p, accept_u,
                            final_u);
  std::vector<at::Tensor> inputs{logits,     a.row_of_node, a.children, a.drafts,    a.valid,      a.temperature,
                                 a.accept_u, a.final_u,     a.accepted, a.last_node, a.final_token};
  for (const at::Tensor& t : {a.top_k, a.top_p, a.min_p})
    if (t.defined()) inputs.push_back(t);
  emu::set_global_ranges(inputs);
  const WalkParams p = make_walk_params(logits, a);
  for (int64_t b = 0; b < a.batch; ++b) {
    emu::run_block({static_cast<unsigned>(b), 0, 0}, {static_cast<unsigned>(a.batch), 1, 1}, cuda::kThreads,
                   sizeof(cuda::WalkShared), [&] { cuda::rejection_walk_kernel<float>(logits.data_ptr<float>(), p); });
  }
  return a.outputs();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention", &tree_attention_emulated);
  m.def("move_accepted_kv", &move_accepted_kv_emulated);
  m.def("target_probs", &target_probs_emulated);
  m.def("rejection_walk", &rejection_walk_emulated);
}
