"""The runner's CUDA graphs beyond vLLM's own (a mixin of :class:`.runner.MedusaRunnerMixin`).

- Uniform steps (every request verifies one tree whole) after the forward pass: the fixed-shape
  functions of :mod:`medusa_vllm.graphed_step` (greedy, and sampled with the step's random
  numbers as inputs), one :class:`BatchGraphs` set per tree (sampled: per tree and per whether
  top-k/top-p apply), captured after vLLM's graphs for the batch sizes vLLM captures.
- The load-adaptive tree's forward: FULL graphs for uniform steps of every tree size and of
  plain decoding, not only of the largest tree (vLLM's one uniform query length): the
  dispatcher gets keys per query length, and captures and dispatches run with it set.
"""

from __future__ import annotations

import contextlib
import os

import torch
from vllm.logger import init_logger

from medusa_vllm.graphed_step import (BatchGraphs, capture_stream, greedy_tree_step, handover, on_stream,
                                      sampled_tree_step)
from medusa_vllm.sampling import StepRandomness

logger = init_logger(__name__)

# MEDUSA_VLLM_KV_MOVE: where a uniform greedy step moves its accepted KV. "graph" (default): inside
# the verify+heads CUDA graph, so the whole step after the forward is one replay; "eager": a
# separate launch right after the replay. Same tokens (H200: same acceptance to 4 digits). On an
# H200 without vLLM (tools/gpu/kv_move_ab.py, benchmarks/results/kv_move_ab_micro_h200.json) the
# in-graph move saved 11-25 us of host time per step and 1-3 us of wall time at batch 1-64;
# end-to-end interleaved runs could not tell the two apart (round-to-round noise +-25%)
_KV_MOVE = os.environ.get("MEDUSA_VLLM_KV_MOVE", "graph") or "graph"
if _KV_MOVE not in ("eager", "graph"):
    raise ValueError(f"MEDUSA_VLLM_KV_MOVE={_KV_MOVE!r}: use 'graph' (the default: the accepted KV "
                     "moves inside the verify+heads graph) or 'eager' (a separate launch after it), or unset it")
KV_MOVE_IN_GRAPH = _KV_MOVE == "graph"
# MEDUSA_VLLM_SAMPLED_GRAPH_ROWS: uniform steps with sampled requests replay CUDA graphs up to this
# many logits rows (batch x (1 + tree nodes)) and only for batch sizes vLLM captures; their static
# logits buffer (one for every tree) holds as many rows of the vocabulary as the largest captured
# step has (bf16: 4096 rows are 0.4 GB for SmolLM2's 49k vocabulary, 1.2 GB for Qwen2.5's 152k);
# larger steps run the same function eagerly, which costs ~700 kernel launches a step
# (H100, 63-node tree, batch 32: 25 ms of host time a step under the profiler)
_ROWS = os.environ.get("MEDUSA_VLLM_SAMPLED_GRAPH_ROWS", "4096") or "0"
if not _ROWS.isdigit():
    raise ValueError(f"MEDUSA_VLLM_SAMPLED_GRAPH_ROWS={_ROWS!r}: use a whole number of logits rows "
                     "(default 4096; 0 runs sampled steps without CUDA graphs), or unset it")
SAMPLED_GRAPH_ROWS = int(_ROWS)
# MEDUSA_VLLM_GRAPH_POOL: "shared" (default): all verify graph sets of a runner in one CUDA graph
# memory pool (one_memory_pool); "per-set": each set in its own pool, as before 2026-12-06 (more
# memory; an A/B or a fallback should sharing ever be suspected)
_POOL = os.environ.get("MEDUSA_VLLM_GRAPH_POOL", "shared") or "shared"
if _POOL not in ("shared", "per-set"):
    raise ValueError(f"MEDUSA_VLLM_GRAPH_POOL={_POOL!r}: use 'shared' (the default: one memory pool for all "
                     "verify graphs) or 'per-set', or unset it")


class GraphMemoryMixin:
    """The V1 and V2 runners' profile run, holding the memory their verify graphs will take
    (:func:`held_through_profile`). Needs ``_medusa_graphs``, ``_medusa_sampled_graphs``,
    ``_medusa_graph_batch_sizes(k)``, ``_medusa_greedy_example`` and ``_medusa_sampled_example``."""

    @torch.inference_mode()
    def profile_run(self) -> None:
        with held_through_profile(self._medusa_graph_bytes(), self.device):
            super().profile_run()

    def _medusa_graph_bytes(self) -> int:
        """The memory the verify graphs will take, measured by running their work once (before
        the KV cache: vLLM may still turn the graphs off if the attention backend cannot take
        them, and then this holds too much)."""
        from vllm.config import CUDAGraphMode

        if (self.device.type != "cuda" or self.model_config.enforce_eager
                or self.compilation_config.cudagraph_mode == CUDAGraphMode.NONE):
            return 0
        return reserved_by(graph_work(self._medusa_graphs, self._medusa_sampled_graphs,
                                      self._medusa_graph_batch_sizes, lambda k: 1 + self.medusa_tree_sizes[k],
                                      self._medusa_greedy_example, self._medusa_sampled_example, self.device))


class MedusaGraphsMixin(GraphMemoryMixin):
    """CUDA-graph set-up and dispatch of the Medusa runner (state built by the runner's
    ``__init__`` through :meth:`_medusa_init_graphs`)."""

    def _medusa_init_graphs(self, graph_trees: list[int], vllm_config) -> None:
        """The uniform-step graph sets of ``graph_trees`` (off unless on one GPU with
        ``cuda_graphs``) and the adaptive tree's extra uniform query lengths."""
        sizes = self.medusa_tree_sizes
        # inputs argmax, drafts, hidden, tree ids (+ the slot mapping when the KV move is in
        # the graph: then a padded replay's extra requests get -1 drafts and slots, so they
        # accept nothing and move no KV)
        self._medusa_graphs = {
            k: BatchGraphs(
                self._medusa_uniform_fn(k),
                rows_per_req=[1 + sizes[k], sizes[k], 1 + sizes[k], 1] + ([1 + sizes[k]] if KV_MOVE_IN_GRAPH else []),
                max_batch=self.max_num_reqs, exact=5,
                name=f"verify+heads{'+KV move' if KV_MOVE_IN_GRAPH else ''} ({sizes[k]} nodes)",
                pad=[None, -1, None, None, -1] if KV_MOVE_IN_GRAPH else None)
            for k in graph_trees
        }
        # uniform steps with sampled requests (any mix with greedy ones): the same, from the
        # logits, with the step's random numbers as inputs; one set per tree and per whether
        # top-k/top-p apply (the sort), batch sizes up to SAMPLED_GRAPH_ROWS logits rows
        # inputs logits, drafts, hidden, tree ids, sampling parameters, uniforms (+ slots)
        self._medusa_sampled_graphs = {
            (k, filtered): BatchGraphs(
                self._medusa_uniform_fn(k, sampled=True, filtered=filtered),
                rows_per_req=[1 + sizes[k], sizes[k], 1 + sizes[k], 1, 1, 1] + ([1 + sizes[k]] if KV_MOVE_IN_GRAPH else []),
                max_batch=min(self.max_num_reqs, SAMPLED_GRAPH_ROWS // (1 + sizes[k])), exact=5,
                name=f"sampled verify+heads{'+KV move' if KV_MOVE_IN_GRAPH else ''} ({sizes[k]} nodes"
                     f"{', top-k/top-p' if filtered else ''})",
                pad=[None, -1, None, None, None, None] + ([-1] if KV_MOVE_IN_GRAPH else []))
            for k in graph_trees for filtered in (False, True)
        }
        for graphs in (*self._medusa_graphs.values(), *self._medusa_sampled_graphs.values()):
            graphs.enabled = (
                self.device.type == "cuda" and self.medusa_cfg.cuda_graphs
                and vllm_config.parallel_config.world_size == 1
            )
        # load-adaptive tree: FULL CUDA graphs for uniform steps of every tree size and of plain
        # decoding (query lengths 1 + nodes, and 1), not only of the largest tree (vLLM's one
        # uniform length): a step outside FULL graphs pays ~0.2 ms of host time per layer
        self._medusa_uniform_lens = sorted(
            ({1 + n for n in self.medusa_tree_sizes} | {1}) - {self.medusa_max_query}
        ) if self.medusa_cfg.adaptive else []

    def capture_model(self) -> int:
        size = super().capture_model()
        from vllm.config import CUDAGraphMode

        if self.compilation_config.cudagraph_mode == CUDAGraphMode.NONE:
            return size
        with one_memory_pool([*self._medusa_graphs.values(), *self._medusa_sampled_graphs.values()]):
            for k, graphs in self._medusa_graphs.items():
                if graphs.enabled:
                    self._medusa_capture_step_graphs(k, graphs, self._medusa_greedy_example)
            capture_sampled_sets(self._medusa_sampled_graphs, self._medusa_graph_batch_sizes,
                                 self._medusa_sampled_example, self._medusa_capture_step_graphs)
        return size

    def _medusa_greedy_example(self, b: int, q: int, k: int, g: torch.Generator) -> tuple:
        """Example inputs of a greedy uniform step's graph (argmax, drafts, hidden, tree ids)."""
        return (
            torch.randint(0, 8, (b * q,), device=self.device, generator=g),
            torch.randint(0, 8, (b * (q - 1),), device=self.device, generator=g, dtype=torch.int32),
            torch.randn(b * q, self.model_config.get_hidden_size(), device=self.device, generator=g,
                        dtype=self.dtype),
            torch.full((b,), k, dtype=torch.int64, device=self.device),
        )

    def _medusa_sampled_example(self, sets: list[BatchGraphs]):
        return sampled_example(sets, self.model, self.model_config.get_hidden_size(), self.device, self.dtype,
                               self.medusa_trees)

    def _medusa_graph_batch_sizes(self, k: int) -> list[int]:
        """Batch sizes B whose uniform step of the largest tree or of tree k (B * (1 + nodes)
        tokens) vLLM captures too, largest first (the smaller graphs reuse its pool)."""
        q = 1 + self.medusa_tree_sizes[k]
        capture_sizes = self.compilation_config.cudagraph_capture_sizes or []
        # vLLM keeps only multiples of the largest tree's query length: tree k's own would leave
        # its small batch sizes without a graph
        return sorted({n // m for n in capture_sizes for m in {q, self.medusa_max_query}
                       if n % m == 0 and 0 < n // m <= self.max_num_reqs}, reverse=True)

    def _medusa_capture_step_graphs(self, k: int, graphs: BatchGraphs, example) -> None:
        """After vLLM's graphs: one graph of tree k's uniform step per batch size of
        :meth:`_medusa_graph_batch_sizes` up to the set's max_batch, on ``example(b, q, k,
        generator)`` inputs. A batch size between two graphs replays the larger one, padded."""
        q = 1 + self.medusa_tree_sizes[k]
        g = torch.Generator(device=self.device).manual_seed(0)
        captured = []
        for b in self._medusa_graph_batch_sizes(k):
            inputs = (
                *example(b, q, k, g),
                # no slots: the capture moves no KV (the kernel is in the graph all the same)
                *((torch.full((b * q,), -1, dtype=torch.int64, device=self.device),) if KV_MOVE_IN_GRAPH else ()),
            )
            if b <= graphs.max_batch and graphs.capture(*inputs):
                captured.append(b)
        logger.info("medusa_vllm: %s CUDA graphs captured for batch sizes %s", graphs.name, captured)

    @contextlib.contextmanager
    def _medusa_query_len(self, q: int):
        """vLLM's uniform-decode query length (runner and graph dispatcher) set to ``q`` for a
        capture or a step of that length: its FULL graphs are keyed by (tokens, requests)."""
        d = getattr(self, "cudagraph_dispatcher", None)
        if d is None:
            yield
            return
        saved = self.uniform_decode_query_len, d.uniform_decode_query_len
        self.uniform_decode_query_len = d.uniform_decode_query_len = q
        try:
            yield
        finally:
            self.uniform_decode_query_len, d.uniform_decode_query_len = saved

    def _check_and_update_cudagraph_mode(self, *args, **kwargs):
        out = super()._check_and_update_cudagraph_mode(*args, **kwargs)
        from vllm.config import CUDAGraphMode

        d = self.cudagraph_dispatcher
        mode = d.cudagraph_mode
        if (not self._medusa_uniform_lens or mode is None or mode == CUDAGraphMode.NONE
                or mode.decode_mode() != CUDAGraphMode.FULL or not mode.separate_routine()):
            return out
        sizes = self.compilation_config.cudagraph_capture_sizes or []
        added = []
        for q in self._medusa_uniform_lens:
            with self._medusa_query_len(q):
                for n in sizes:
                    if n % q == 0 and n // q <= self.max_num_reqs:
                        d.add_cudagraph_key(CUDAGraphMode.FULL,
                                            d._create_padded_batch_descriptor(n, True, False, 0))
                        added.append((q, n // q))
        logger.info("medusa_vllm: FULL CUDA graphs also for uniform steps (query length, "
                    "requests) %s", added)
        return out

    def _warmup_and_capture(self, desc, *args, **kwargs):
        q = desc.num_tokens // desc.num_reqs if desc.uniform and desc.num_reqs else None
        if q is None or q not in self._medusa_uniform_lens:
            return super()._warmup_and_capture(desc, *args, **kwargs)
        with self._medusa_query_len(q):
            return super()._warmup_and_capture(desc, *args, **kwargs)

    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, num_scheduled_tokens_np,
                                               max_num_scheduled_tokens, *args, **kwargs):
        q = max_num_scheduled_tokens
        if (q in self._medusa_uniform_lens and num_tokens == q * num_reqs
                and kwargs.get("force_uniform_decode") is None):
            with self._medusa_query_len(q):
                out = super()._determine_batch_execution_and_padding(
                    num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens,
                    *args, **kwargs)
        else:
            out = super()._determine_batch_execution_and_padding(
                num_tokens, num_reqs, num_scheduled_tokens_np, max_num_scheduled_tokens, *args, **kwargs)
        if kwargs.get("force_uniform_decode") is None:  # a step's, not a capture's
            self.medusa_paths.count(f"forward {getattr(out[0], 'name', out[0])}")
            # tokens the graph's batch adds to the step's (vLLM rounds its capture sizes up to
            # multiples of the largest tree's query length: a smaller tree's uniform step, or a
            # plain one, replays a larger graph)
            padded = getattr(out[1], "num_tokens", num_tokens) - num_tokens
            if padded > 0:
                self.medusa_paths.count("forward padding tokens", padded)
        return out

    def _medusa_uniform_fn(self, k: int, sampled: bool = False, filtered: bool = False):
        """The fixed-shape function the CUDA graphs of tree k hold (no host syncs): verify tree
        k (greedy: from each row's argmax; ``sampled``: from the logits, ``filtered``: some
        request uses top-k/top-p), with KV_MOVE_IN_GRAPH move each request's accepted KV
        (``slot_mapping`` [B*Q]: its window's slots, -1: none), and draft the tree
        ``_medusa_graph_next_tree`` names. Outputs: tokens, accepted, num_accepted, the next
        step's roots and counts, drafts, then the heads' top-k and finite flags (from which
        the runner gathers another tree's drafts when the next step's tree differs)."""
        cfg = self.medusa_cfg

        def propose(b: int, keep: list):
            k_next = self._medusa_graph_next_tree(k, b)
            return lambda h: self._medusa_head_drafts(h, k_next, keep)

        def finish(out, b: int, slot_mapping, keep: list):
            if slot_mapping is not None:
                q = slot_mapping.shape[0] // b
                starts = torch.arange(0, (b + 1) * q, q, dtype=torch.int32, device=slot_mapping.device)
                self._medusa_move_kv(slot_mapping, starts, out.accepted)
            return (out.tokens, out.accepted, out.num_accepted, *handover(out.tokens, out.num_accepted),
                    out.drafts, *keep)

        def greedy_step(argmax, drafts, hidden, tree_ids, slot_mapping=None):
            b, keep = tree_ids.shape[0], []
            out = greedy_tree_step(argmax, drafts, hidden, tree_ids, self.medusa_trees, propose(b, keep))
            return finish(out, b, slot_mapping, keep)

        def sampled_step(logits, drafts, hidden, tree_ids, params, rand, slot_mapping=None):
            b, keep = tree_ids.shape[0], []
            out = sampled_tree_step(logits, drafts, hidden, tree_ids, params, rand, self.medusa_trees,
                                    propose(b, keep), cfg.acceptance, filtered, cfg.typical_eps,
                                    cfg.typical_delta)
            return finish(out, b, slot_mapping, keep)

        return sampled_step if sampled else greedy_step


@contextlib.contextmanager
def one_memory_pool(sets):
    """Captures inside the block put every set of ``sets`` (BatchGraphs) in one CUDA graph
    memory pool, and the memory they took is logged. Each set alone would keep its own pool,
    as large as its largest graph's intermediates: with the load-adaptive tree's 5 trees ×
    (greedy + 2 sampled) sets, 15 pools (on an H100 the adaptive engine then used 29.1 GiB
    where vLLM had planned 23.8 for it, and a third engine beside it ran out of memory). One
    pool is safe because the runners replay one graph per step and use or copy its outputs on
    the same stream before the next replay of any set (BatchGraphs' contract, across sets)."""
    sets = [g for g in sets if g.enabled]
    if not sets or not torch.cuda.is_available():
        yield
        return
    if _POOL == "shared":
        pool = torch.cuda.graph_pool_handle()
        for g in sets:
            g.pool = pool
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the capture's eager runs (reference, warm-up) left blocks cached
    taken = free - torch.cuda.mem_get_info()[0]
    logger.info("medusa_vllm: verify graphs of %d sets (%d graphs) in %s: %.2f GiB", len(sets),
                sum(len(g.graphs) for g in sets), "one memory pool" if _POOL == "shared" else "a pool each",
                taken / 2**30)


def graph_work(greedy: dict, sampled: dict, batch_sizes, query_len, greedy_example, make_sampled_example,
               device):
    """``run() -> kept``: each enabled verify graph set's function run once, eagerly, at the
    largest batch size it will capture, on that capture's example inputs (no KV moved), every
    input and output kept, on the stream the captures use: the work whose memory the captured
    graphs hold (their static inputs, the shared logits buffer, their outputs, the
    intermediates at their peak). ``greedy``:
    ``{k: BatchGraphs}``, ``sampled``: ``{(k, filtered): BatchGraphs}``; ``batch_sizes(k)``
    and ``query_len(k)`` as the captures use them; the examples as :meth:`capture_model`'s."""
    def run() -> list:
        with on_stream(capture_stream(device)):  # the captures' stream: its cuBLAS workspace too
            return work()

    def work() -> list:
        g = torch.Generator(device=device).manual_seed(0)
        kept = []
        for k, graphs in greedy.items():
            b = largest_capture(batch_sizes(k), graphs.max_batch)
            if graphs.enabled and b:
                inputs = greedy_example(b, query_len(k), k, g)
                kept.append((inputs, graphs.fn(*inputs)))
        live = live_sampled_sets(sampled, batch_sizes)
        if live:
            example = make_sampled_example(live)  # the shared buffers it makes are kept too
            kept.append([gr.buffers for gr in live])
            for (k, _), graphs in sampled.items():
                if graphs in live:
                    inputs = example(graphs.max_batch, query_len(k), k, g)
                    kept.append((inputs, graphs.fn(*inputs)))
            for graphs in live:  # the captures make them again
                graphs.buffers = {}
        return kept

    return run


def reserved_by(run) -> int:
    """Bytes the CUDA caching allocator reserves for ``run()`` while its result lives: at least
    the peak its allocations reach (freed blocks stay cached until ``empty_cache``); released
    after, less what stays reserved after it (allocated for good). 0 off CUDA, and 0 (logged)
    where ``run`` fails: the KV cache is then sized as vLLM alone would, without room for the
    graphs, rather than the engine not starting."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    try:
        kept = run()
    except Exception as exc:  # noqa: BLE001 - the measurement only: vLLM's plan stands
        logger.warning("medusa_vllm: measuring the verify CUDA graphs' memory failed (%s: %s); vLLM sizes "
                       "the KV cache without room for them: lower --gpu-memory-utilization if the "
                       "capture runs out of memory", type(exc).__name__, exc)
        torch.cuda.empty_cache()
        return 0
    torch.cuda.synchronize()
    taken = torch.cuda.memory_reserved() - before
    del kept
    torch.cuda.empty_cache()
    # what stays reserved (a new stream's cuBLAS workspace) is allocated for good: vLLM's
    # profile sees it already
    return max(taken - (torch.cuda.memory_reserved() - before), 0)


@contextlib.contextmanager
def held_through_profile(nbytes: int, device):
    """vLLM sizes the KV cache from the memory its profile run peaks at, and our verify graphs,
    captured after the KV cache is allocated, are not in that run (vLLM 0.26 leaves even its own
    graphs out unless VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1): ``nbytes`` held through the
    block (the profile run) puts them in its peak, so the KV cache leaves room for them. On an
    H100 the verify graphs of a 63-node tree at batch 64 took 1.7 GiB beyond vLLM's plan, and
    four engines of 0.225 of the memory each ran out of memory at the fourth's capture."""
    held = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes > 0 else None
    if held is not None:
        logger.info("medusa_vllm: %.2f GiB held through vLLM's memory profile for the verify CUDA graphs "
                    "(their work run once eagerly)", nbytes / 2**30)
    try:
        yield
    finally:
        del held


def largest_capture(batch_sizes, max_batch: int) -> int:
    """The largest of ``batch_sizes`` a set of ``max_batch`` captures (0: none)."""
    return max((b for b in batch_sizes if b <= max_batch), default=0)


def live_sampled_sets(sets: dict, batch_sizes) -> list[BatchGraphs]:
    """The sampled uniform-step graph sets (``{(tree k, filtered): BatchGraphs}``) that will
    capture a graph, each set's max_batch lowered to the largest of ``batch_sizes(k)`` it can
    take (its buffers are sized for it: idempotent)."""
    for (k, _), graphs in sets.items():
        graphs.max_batch = largest_capture(batch_sizes(k), graphs.max_batch)
    return [g for g in sets.values() if g.enabled and g.max_batch > 0]


def capture_sampled_sets(sets: dict, batch_sizes, make_example, capture) -> None:
    """Captures the sampled uniform-step graph sets (``{(tree k, filtered): BatchGraphs}``) of
    the V1 or V2 runner: each set's buffers sized for the largest of ``batch_sizes(k)`` it can
    take, not its max_batch, then every enabled set with a batch size captured by
    ``capture(k, graphs, example)`` on the examples ``make_example(those sets)`` makes (one
    shared logits buffer for all)."""
    live = live_sampled_sets(sets, batch_sizes)
    if live:
        example = make_example(live)
        for (k, _), graphs in sets.items():
            if graphs in live:
                capture(k, graphs, example)


def sampled_example(sets: list[BatchGraphs], model, hidden_size: int, device, dtype, trees, keyed: bool = False):
    """``example(b, q, k, generator)``: inputs of a sampled uniform step's graph (logits, drafts,
    hidden, tree ids, sampling parameters, random numbers: [b, L*C+1] uniforms, or [b, 2] int64
    (seed, counter) keys if ``keyed``), for the V1 and the V2 runner. The logits buffer (the
    large one: rows of the vocabulary) all ``sets`` share: one call replays at a time and loads
    its own inputs first; the examples' logits are drawn in place in it (a copy of rows ×
    vocabulary made for each capture would stay cached beside the graphs). The logits' dtype
    and width are the model's (its logits processor's output), read off one dummy row."""
    with torch.inference_mode():
        probe = model.compute_logits(torch.zeros(1, hidden_size, device=device, dtype=dtype))
    vocab, logits_dtype = probe.shape[-1], probe.dtype
    shared = torch.zeros(max(g.rows_per_req[0] * g.max_batch for g in sets), vocab, dtype=logits_dtype,
                         device=device)
    for graphs in sets:
        graphs.buffers = {0: shared}
    n_rand = StepRandomness.flat_width(trees.max_depth + 1, trees.children.shape[2])

    def example(b: int, q: int, k: int, g: torch.Generator) -> tuple:
        if keyed:
            rand = torch.randint(0, 2**31, (b, 2), device=device, generator=g, dtype=torch.int64)
        else:
            rand = torch.rand(b, n_rand, device=device, generator=g)
        return (
            shared[: b * q].normal_(generator=g),
            torch.randint(0, 8, (b * (q - 1),), device=device, generator=g, dtype=torch.int32),
            torch.randn(b * q, hidden_size, device=device, generator=g, dtype=dtype),
            torch.full((b,), k, dtype=torch.int64, device=device),
            torch.tensor([1.0, 5.0, 0.9, 0.05], device=device).repeat(b, 1),
            rand,
        )

    return example
