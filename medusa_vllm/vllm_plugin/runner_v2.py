"""medusa_vllm on vLLM 0.26's V2 model runner (``"runner": "v2"`` in the speculative config; GPU).

vLLM gives its V2 runner (``vllm/v1/worker/gpu/``) only to EAGLE-type drafters; every other
method, Medusa included, falls back to the V1 runner, whose host work per step is larger
(``benchmarks/results/step_log_h100_v1_vs_v2_eec25a7.json``: about 1 ms a step at batch 64).
V2 prepares a step's inputs on the GPU: positions, input ids (the last sampled token and the
drafts, read from its device-side request state), slot mappings, and its bookkeeping after
sampling. Medusa trees fit into that with four overrides of :class:`GPUModelRunner` (V2), the
plugin's choice of runner (``vllm_plugin/__init__.py``) and our speculator
(:class:`MedusaV2Speculator`):

1. ``prepare_attn``: vLLM computed the slot mappings from linear positions (the KV of node j
   goes to slot ``base + j``); we then add ``depth(j) - j`` to the positions of tree nodes
   (RoPE sees ``base + depth``), write each request's mask id (tree + 1, 0: causal) only when
   it changed, and tell the attention builders how many leading requests are tree decodes
   (vLLM's V2 sorts requests with the full query length first, shorter ones by length).
2. ``sample``: every request's tree verified (:mod:`medusa_vllm.packed_step`; greedy requests
   by the target argmax, sampled ones by lossless rejection sampling or typical acceptance,
   :func:`medusa_vllm.verify.verify`, with vLLM's per-request temperature, top-k, top-p and
   min-p), the accepted path's KV moved into the consecutive slots vLLM's bookkeeping expects
   (it advances ``num_computed`` by ``query_len - num_rejected``, ``num_rejected = nodes -
   accepted``), and the next drafts from the heads at each request's last accepted node.
   Logit biases and allowed tokens enter every row (V2's own kernel), repetition, presence
   and frequency penalties each tree row along its own path (:mod:`.penalties_v2`); logprobs
   (raw modes) come from each emitted token's own row. A uniform step (every request verifies
   one whole tree) runs all of that as one fixed-shape function, replayed from a CUDA graph
   per batch size (sampled steps: with the step's random numbers drawn first, as inputs). A
   request whose options the tree rows do not reproduce (min-tokens, bad words, processed
   logprobs: ``step.v2_mode``) has its drafts rejected and takes its root token from vLLM's
   own sampler, so it is served exactly, without speedup; the step's other requests keep
   their drafts (unless that request asks for logprobs: then the whole step is vLLM's).
3. ``capture_model``: vLLM's FULL graphs of uniform tree steps (every request 1 + nodes tokens)
   hold the tree kernel, those of plain decoding (1 token) vLLM's own attention; then the
   verify+heads graphs of each tree.
4. ``add_requests``: how each request is verified; ``execute_model``: the draft count vLLM's
   scheduler reserved for the next step, whose tree the drafts of this step follow.

The load-adaptive tree runs as vLLM's dynamic speculative decoding (asynchronous scheduling):
the scheduler's table (the budget rule's, rewritten by the measured rule in medusa_vllm's
scheduler, as on V1) sets each step's draft count; a count names a tree (0: no drafts, a plain
step that is vLLM's own: its attention, its sampler, no heads). Each request slot remembers the
tree its stored drafts follow; a request that got more drafts than that tree has (placeholders
after a change of count) verifies them as the largest tree, which stays exact.

Scope: one GPU, 1-D RoPE, no structured output.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu import model_runner as v2_model_runner
from vllm.v1.worker.gpu.buffer_utils import async_copy_to_gpu
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from vllm.v1.worker.gpu.sample.logprob import compute_topk_scores
from vllm.v1.worker.gpu.sample.output import SamplerOutput
from vllm.v1.worker.gpu.sample.states import NO_LOGPROBS
from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator

from medusa_vllm import kernels
from medusa_vllm.adaptive import NO_TREE, AdaptiveTreePolicy
from medusa_vllm.graphed_step import BatchGraphs, greedy_tree_step, sampled_tree_step, sampling_params_tensor
from medusa_vllm.packed_step import (
    greedy_packed, num_sampled_and_rejected, path_rows, reject_all, reject_rows, slot_rows, tree_positions_delta,
)
from medusa_vllm.sampling import SamplingBatch
from medusa_vllm.tree_tensors import TreeTensors, causal_masks
from medusa_vllm.verify import verify
from medusa_vllm.vllm_plugin.attention import MedusaAttnContext, TreeAttnStep
from medusa_vllm.vllm_plugin.config import MedusaConfigError, MedusaSpecConfig
from medusa_vllm.vllm_plugin.graphs import (SAMPLED_GRAPH_ROWS, GraphMemoryMixin, capture_sampled_sets,
                                            one_memory_pool, sampled_example)
from medusa_vllm.vllm_plugin.penalties_v2 import any_penalty, packed_tree_logits, v2_penalties
from medusa_vllm.vllm_plugin.proposer import MedusaTreeProposer
from medusa_vllm.vllm_plugin.runner import MedusaStats, StepPaths, _attention_backend, region
from medusa_vllm.vllm_plugin.step import (
    V2_GREEDY, V2_NO_SPEC, V2_SAMPLED, position_offsets, step_trees, tree_lead, v2_mode,
)
from medusa_vllm.vllm_plugin.step_cache import uniform_drafts
from medusa_vllm.vllm_plugin.top_k_top_p import sampling_ops
from medusa_vllm.vllm_plugin.worker import _swapped

logger = init_logger(__name__)


class MedusaV2Speculator(DraftModelSpeculator):
    """What V2's runner calls a speculator: owns the heads; ``propose`` returns the drafts the
    runner's ``sample`` already computed (or, after a step without drafts, the heads' drafts at
    each request's last token). Nothing of :class:`DraftModelSpeculator`'s draft-model
    machinery is used; subclassing it makes the runner load the heads with the target and
    hand us its attention set-up."""

    def __init__(self, vllm_config, device: torch.device) -> None:  # no super(): no draft model
        self.vllm_config = vllm_config
        self.device = device
        self.speculative_config = vllm_config.speculative_config
        self.proposer = MedusaTreeProposer(vllm_config)
        self.model: torch.nn.Module | None = None  # the heads, once loaded
        self.draft_logits = None  # read by V2's chain rejection sampler, which we replace
        self.supports_mm_inputs = False
        self.runner: MedusaV2ModelRunner | None = None

    def load_model(self, target_model: torch.nn.Module) -> None:
        self.model = self.load_draft_model(target_model, set())

    def load_draft_model(self, target_model: torch.nn.Module, target_attn_layer_names) -> torch.nn.Module:
        self.proposer.load_model(target_model)  # the heads read the target's hidden state, no attention
        return self.proposer.heads

    def set_attn(self, *args, **kwargs) -> None:
        return None  # the heads attend nothing

    def init_cudagraph_manager(self, cudagraph_mode) -> None:
        return None  # the runner captures the verify+heads graphs (capture_model)

    def capture(self) -> None:
        return None

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                num_sampled, num_rejected, last_sampled, next_prefill_tokens, temperature, seeds,
                num_tokens_across_dp=None, dummy_run: bool = False, skip_attn_for_dummy_run: bool = False,
                mm_inputs=None, is_profile: bool = False) -> torch.Tensor:
        assert self.runner is not None, "MedusaV2ModelRunner sets runner"
        return self.runner._medusa_propose(input_batch, last_hidden_states, dummy_run)


class MedusaV2ModelRunner(GraphMemoryMixin, GPUModelRunner):
    medusa_runner = "v2"  # medusa_stats() names the runner

    def __init__(self, vllm_config, device: torch.device) -> None:
        with _swapped(v2_model_runner, "init_speculator", MedusaV2Speculator):
            super().__init__(vllm_config, device)
        cfg = MedusaSpecConfig.from_dict(vllm_config.additional_config["medusa_vllm"])
        self.medusa_sampling_ops = sampling_ops(device, vllm_config.model_config.get_vocab_size())
        self._medusa_init(cfg, _attention_backend(cfg.attention, vllm_config, device),
                          graphs=(device.type == "cuda" and cfg.cuda_graphs
                                  and vllm_config.parallel_config.world_size == 1))
        if self.speculator is not None:
            self.speculator.runner = self

    def _medusa_init(self, cfg: MedusaSpecConfig, attention: str, graphs: bool) -> None:
        """medusa_vllm's state (after vLLM's ``__init__``: reads ``num_speculative_steps``,
        ``max_num_reqs`` and ``device``)."""
        device = self.device
        self.medusa_cfg = cfg
        trees = cfg.trees
        sizes = [len(t) for t in trees]
        q = 1 + self.num_speculative_steps  # 1 + the largest tree's nodes: vLLM's decode_query_len
        if q != 1 + max(sizes):
            raise MedusaConfigError(f"medusa_vllm: num_speculative_tokens {q - 1} != largest tree {max(sizes)}")
        self.medusa_max_query = q
        self.medusa_tree_sizes = sizes
        self._medusa_sizes_np = np.array(sizes)
        self._medusa_largest = int(np.argmax(sizes))
        self.medusa_policy = AdaptiveTreePolicy(trees, cfg.adaptive, cfg.adaptive_max_tokens, device.type)
        self.medusa_trees = TreeTensors.build(trees, device, q_max=q)
        offsets = np.zeros((len(trees), q), dtype=np.int64)
        for k, o in enumerate(position_offsets(trees)):
            offsets[k, : len(o)] = o
        self.medusa_offsets = torch.from_numpy(offsets.reshape(-1)).to(device)  # [NT * Q] depth - j
        masks = torch.cat([causal_masks(q), self.medusa_trees.masks.cpu()])
        self.medusa_attn = MedusaAttnContext(kernels.pack_tree_masks(masks).to(device), self.max_num_reqs,
                                             backend=attention)
        self._medusa_mask_np = np.zeros(self.max_num_reqs, dtype=np.int32)  # what mask_ids holds
        self._medusa_mode = np.zeros(self.max_num_reqs, dtype=np.int8)  # per request slot: step.v2_mode
        # per request slot: the tree its stored drafts follow (host: -1 none; device: >= 0)
        self._medusa_tree_np = np.full(self.max_num_reqs, -1, dtype=np.int64)
        self._medusa_req_tree = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)
        self._medusa_step_trees: np.ndarray | None = None  # this step's tree per request
        self._medusa_deltas: dict[tuple[int, int], torch.Tensor] = {}  # uniform steps' position deltas
        self._medusa_uniform_k: int | None = None  # the tree every request of this step verifies whole
        self._medusa_tree_ids = [torch.full((self.max_num_reqs,), k, dtype=torch.int64, device=device)
                                 for k in range(len(trees))]
        self._medusa_no_drafts = torch.zeros((self.max_num_reqs, q - 1), dtype=torch.int64, device=device)
        # which (head, rank) each node of each tree reads: [NT, Q-1]
        self._medusa_head_idx = (self.medusa_trees.depths[:, 1:] - 1).clamp_min(0)
        self._medusa_rank_idx = self.medusa_trees.ranks[:, 1:].clamp_min(0)
        self._medusa_sched = max(sizes)  # drafts vLLM's scheduler reserved for the next step
        self._medusa_slots: torch.Tensor | None = None  # this step's slot mapping (KV group 0)
        self._medusa_next: torch.Tensor | None = None  # drafts computed by this step's sample
        self._medusa_logprobs = None  # the root rows' logprobs of a step that accepted nothing
        self._medusa_kv_views = None
        self._medusa_kv_checked = False
        self._medusa_fallback_warned = False
        self.medusa_stats = MedusaStats(self.medusa_trees.max_depth, device)
        self.medusa_paths = StepPaths()
        # uniform steps of tree k: one function each, CUDA-graphed per batch size; it drafts tree
        # k next (the steady state) and returns the heads' top-k, from which a step whose next
        # draft count names another tree gathers that tree's drafts
        self._medusa_graphs = {}
        for k in self.medusa_policy.order:
            n = 1 + sizes[k]
            self._medusa_graphs[k] = BatchGraphs(
                self._medusa_uniform_fn(k), rows_per_req=[n, n, n, n], max_batch=self.max_num_reqs, exact=5,
                name=f"verify+heads+KV move ({sizes[k]} nodes, V2)", pad=[None, -1, None, -1])
            self._medusa_graphs[k].enabled = graphs
        # uniform steps with sampled requests (any mix with greedy ones): from the logits, with
        # the step's random numbers as inputs; per tree and per whether top-k/top-p apply (the
        # sort), up to SAMPLED_GRAPH_ROWS logits rows (the shared logits buffer's size)
        # inputs logits, drafts, hidden, tree ids, sampling parameters, (seed, counter) keys, slots
        self._medusa_sampled_graphs = {}
        for k in self.medusa_policy.order:
            n = 1 + sizes[k]
            for filtered in (False, True):
                g = BatchGraphs(
                    self._medusa_sampled_fn(k, filtered), rows_per_req=[n, n - 1, n, 1, 1, 1, n],
                    max_batch=min(self.max_num_reqs, SAMPLED_GRAPH_ROWS // n), exact=5,
                    name=f"sampled verify+heads+KV move ({sizes[k]} nodes{', top-k/top-p' if filtered else ''}, V2)",
                    pad=[None, -1, None, None, None, None, -1])
                g.enabled = graphs and g.max_batch > 0
                self._medusa_sampled_graphs[(k, filtered)] = g

    # ------------------------------------------------------------------ set-up
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if getattr(self.model_state, "rope_state", None) is not None:
            raise MedusaConfigError("medusa_vllm: the V2 runner supports 1-D RoPE models only (this one "
                                    'has multi-dimensional positions); use "runner": "v1"')

    def initialize_kv_cache(self, kv_cache_config) -> None:
        super().initialize_kv_cache(kv_cache_config)
        for groups in self.attn_groups:
            for group in groups:
                builder = group.get_metadata_builder(0)
                if not hasattr(builder, "medusa"):
                    raise RuntimeError(
                        f"medusa_vllm needs its tree attention backend, but vLLM selected "
                        f"{group.backend.get_name()}; do not pass --attention-backend with medusa_vllm")
                builder.medusa = self.medusa_attn

    def capture_model(self) -> int:
        # FULL graphs of uniform tree steps run every request through the tree kernel (the
        # builder takes a capture batch that is uniform with 2..Q tokens per request)
        self.medusa_attn.step = TreeAttnStep.for_capture(uniform_only=True)
        try:
            size = super().capture_model()
        finally:
            self.medusa_attn.step = None
        if self.cudagraph_manager.needs_capture():
            with one_memory_pool([*self._medusa_graphs.values(), *self._medusa_sampled_graphs.values()]):
                for k, graphs in self._medusa_graphs.items():
                    if graphs.enabled:
                        self._medusa_capture_graphs(k, graphs, self._medusa_greedy_example)
                capture_sampled_sets(self._medusa_sampled_graphs, self._medusa_graph_batch_sizes,
                                     self._medusa_sampled_example, self._medusa_capture_graphs)
        return size

    def _medusa_graph_batch_sizes(self, k: int) -> list[int]:
        """Batch sizes whose uniform steps of tree k vLLM captures, largest first."""
        return self._medusa_graph_batches(1 + self.medusa_tree_sizes[k])

    def _medusa_graph_batches(self, q: int) -> list[int]:
        """Batch sizes whose uniform steps of q tokens per request vLLM captures, largest first."""
        sizes = self.compilation_config.cudagraph_capture_sizes or []
        return sorted({n // q for n in sizes if n % q == 0 and 0 < n // q <= self.max_num_reqs}, reverse=True)

    def _medusa_capture_graphs(self, k: int, graphs: BatchGraphs, example) -> None:
        q = 1 + self.medusa_tree_sizes[k]
        g = torch.Generator(device=self.device).manual_seed(0)
        captured = []
        for b in self._medusa_graph_batches(q):
            slots = torch.full((b * q,), -1, dtype=torch.int64, device=self.device)  # no KV moved
            if b <= graphs.max_batch and graphs.capture(*example(b, q, k, g), slots):
                captured.append(b)
        logger.info("medusa_vllm: %s CUDA graphs captured for batch sizes %s", graphs.name, captured)

    def _medusa_greedy_example(self, b: int, q: int, k: int, g: torch.Generator) -> tuple:
        """Example inputs of a greedy uniform step (argmax, input ids, hidden)."""
        return (torch.randint(0, 8, (b * q,), device=self.device, generator=g),
                torch.randint(0, 8, (b * q,), device=self.device, generator=g, dtype=torch.int32),
                torch.randn(b * q, self.model_config.get_hidden_size(), device=self.device, generator=g,
                            dtype=self.dtype))

    def _medusa_sampled_example(self, sets: list[BatchGraphs]):
        return sampled_example(sets, self.model, self.model_config.get_hidden_size(), self.device, self.dtype,
                               self.medusa_trees, keyed=True)

    def add_requests(self, scheduler_output) -> None:
        super().add_requests(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            idx = self.req_states.req_id_to_index[new.req_id]
            sp = new.sampling_params
            self._medusa_mode[idx] = v2_mode(sp, self.model_config.logprobs_mode)
            self._medusa_tree_np[idx] = -1

    def execute_model(self, scheduler_output, *args, dummy_run: bool = False, **kwargs):
        if not dummy_run:  # under asynchronous scheduling: the next step's draft count
            self._medusa_sched = scheduler_output.num_spec_tokens_to_schedule
        return super().execute_model(scheduler_output, *args, dummy_run=dummy_run, **kwargs)

    # ------------------------------------------------------------------ inputs of a step
    def prepare_attn(self, input_batch):
        block_tables, slot_mappings = super().prepare_attn(input_batch)  # slots from linear positions
        self._medusa_slots = slot_mappings[0]
        self._medusa_prepare_tree(input_batch)
        return block_tables, slot_mappings

    def _medusa_prepare_tree(self, input_batch) -> None:
        """Each request's tree, tree positions, mask ids and the attention builders' split of a
        step whose slot mappings vLLM has computed."""
        ctx = self.medusa_attn
        self._medusa_step_trees = self._medusa_uniform_k = None
        if input_batch.num_draft_tokens == 0:
            ctx.step = None  # a plain step: vLLM's attention throughout
            self.medusa_paths.key = "0"
            return
        n = input_batch.num_draft_tokens_per_req  # [R]
        has = n > 0
        r = input_batch.num_reqs
        idx = input_batch.idx_mapping_np
        rec = self._medusa_tree_np[idx]
        trees = step_trees(n, rec, self._medusa_sizes_np, self._medusa_largest)
        self._medusa_step_trees = trees
        changed = has & (trees != rec)
        if changed.any():  # drafts verified as another tree than they were made for (rare)
            self._medusa_tree_np[idx[changed]] = trees[changed]
            self._medusa_write(self._medusa_req_tree, np.clip(self._medusa_tree_np[idx], 0, None),
                               index=input_batch.idx_mapping)
        lead = tree_lead(has, input_batch.num_scheduled_tokens, self.medusa_max_query)
        want = np.where(has[:lead], trees[:lead] + 1, 0).astype(np.int32)  # tree + 1, 0: causal
        if not np.array_equal(self._medusa_mask_np[:lead], want):
            self._medusa_mask_np[:lead] = want
            self._medusa_write(ctx.mask_ids[:lead], want)
        k = self._medusa_uniform_k = self._medusa_uniform_tree(input_batch)
        self.medusa_paths.key = str(self.medusa_tree_sizes[k]) if k is not None else "mixed"
        with region("medusa: tree positions"):
            if k is not None:  # every row is a logits row: add tree k's offsets, tiled (cached)
                delta = self._medusa_uniform_delta(k, r)
                input_batch.positions[: delta.shape[0]] += delta
            else:
                row_tree = self._medusa_req_tree[input_batch.expanded_idx_mapping]  # [L]
                delta = tree_positions_delta(row_tree * self.medusa_max_query + input_batch.expanded_local_pos,
                                             self.medusa_offsets)
                input_batch.positions.index_add_(0, input_batch.logits_indices, delta)
        ctx.step = TreeAttnStep(lead, int(input_batch.query_start_loc_np[lead]), all_reqs=lead == r)

    def _medusa_uniform_delta(self, k: int, r: int) -> torch.Tensor:
        """[r * (1 + nodes)] int64: tree k's ``depth - slot`` for r requests (made once per k, r)."""
        key = (k, r)
        delta = self._medusa_deltas.get(key)
        if delta is None:
            q = 1 + self.medusa_tree_sizes[k]
            start = k * self.medusa_max_query
            delta = self._medusa_deltas[key] = self.medusa_offsets[start: start + q].repeat(r)
        return delta

    def _medusa_write(self, out: torch.Tensor, values: np.ndarray, index: torch.Tensor | None = None) -> None:
        """Host values into a device tensor (at rows ``index`` if given), without a host sync."""
        src = torch.from_numpy(np.ascontiguousarray(values)).to(out.dtype)
        if index is None:
            if out.is_cuda:
                async_copy_to_gpu(src, out=out)
            else:
                out.copy_(src)
            return
        out[index.long()] = _to_device(src, out.device)

    def _medusa_uniform_tree(self, input_batch) -> int | None:
        """The tree k every request of this step verifies whole (all decoding, every row a
        logits row: the fixed-shape functions of tree k apply when the next drafts follow k
        too), or None."""
        trees = self._medusa_step_trees
        if trees is None or input_batch.num_draft_tokens_per_req is None:
            return None
        k = int(trees[0])
        q = 1 + self.medusa_tree_sizes[k]
        r = input_batch.num_reqs
        if (input_batch.num_tokens != r * q or input_batch.logits_indices.shape[0] != r * q
                or not (trees == k).all() or not (input_batch.num_draft_tokens_per_req == q - 1).all()):
            return None
        return k

    # ------------------------------------------------------------------ verification
    def sample(self, hidden_states, input_batch, grammar_output):
        self._medusa_next = None
        if input_batch.num_draft_tokens == 0:
            return super().sample(hidden_states, input_batch, grammar_output)
        if grammar_output is not None:
            raise RuntimeError("medusa_vllm: structured output is not supported by the V2 runner "
                               '(use "runner": "v1")')
        r = input_batch.num_reqs
        modes = self._medusa_mode[input_batch.idx_mapping_np]
        mode = V2_SAMPLED if (modes == V2_SAMPLED).any() else V2_GREEDY
        reject = None  # [R] bool: requests that cannot speculate, among others that can
        if (nospec := modes == V2_NO_SPEC).any():
            # (a non-speculating request's logprobs come from vLLM's sampler, for the whole step)
            if nospec.all() or self.sampler.returns_logprobs(input_batch.idx_mapping_np[nospec]):
                mode = V2_NO_SPEC  # the whole step from vLLM's sampler (its logprobs too)
            else:
                reject = nospec
        k = self._medusa_uniform_k if mode != V2_NO_SPEC and reject is None else None  # (_medusa_prepare_tree)
        if k is not None and mode == V2_SAMPLED:
            sampling = self._medusa_sampling(input_batch)
        cu = input_batch.cu_num_logits
        if k is not None:  # every row is a logits row, in order; no prefill chunk
            # the tree of the next drafts: k in the steady state; another one (or none) when the
            # scheduler changed the draft count (load-adaptive tree): then the function of tree k
            # still runs, and the next drafts are gathered from its heads' top-k
            nxt = self.medusa_policy.tree_of_num_drafts(self._medusa_sched)
            self.medusa_paths.count(("verify fixed-shape" if mode == V2_GREEDY else "verify fixed-shape sampled")
                                    + (", next tree changes" if nxt != k else ""))
            n_logits = input_batch.logits_indices.shape[0]
            hidden = hidden_states[:n_logits]
            ids, slots = input_batch.input_ids[:n_logits], self._medusa_slots[:n_logits]
            with region("medusa: verify+heads"):
                raw = self.model.compute_logits(hidden)
                logits = self._medusa_penalized(raw, input_batch)
                if mode == V2_GREEDY:
                    out = self._medusa_graphs[k](logits.argmax(dim=-1), ids, hidden, slots)
                else:
                    out = self._medusa_sampled_graphs[(k, sampling.filtered)](
                        logits, uniform_drafts(ids, r, n_logits // r), hidden, self._medusa_tree_ids[k][:r],
                        sampling_params_tensor(sampling), sampling.keys, slots)
                tokens, num_accepted, num_sampled, num_rejected, accepted, drafts, topk, finite = out
                # copies: AsyncOutput reads them on a side stream, past the next replay
                tokens, num_sampled, num_rejected = tokens.clone(), num_sampled.clone(), num_rejected.clone()
                if nxt == k:
                    self._medusa_next = (k, drafts.clone())
                elif nxt == NO_TREE:
                    self._medusa_next = (NO_TREE, self._medusa_no_drafts[:r])
                else:  # (a new tensor, read before the next replay on this stream)
                    self._medusa_next = (nxt, self._medusa_tree_drafts(topk, finite, nxt))
                self._medusa_logprobs = self._medusa_path_logprobs(raw, input_batch, accepted, tokens)
            has = torch.ones_like(num_accepted, dtype=torch.bool)
        else:
            self.medusa_paths.count({V2_GREEDY: "verify general", V2_SAMPLED: "verify general sampled",
                                     V2_NO_SPEC: "verify none (a request that cannot speculate)"}[mode]
                                    + (", some requests without drafts" if reject is not None else ""))
            # (vLLM's sampler, which a step with such a request calls, is not ours to guard)
            guard = mode != V2_NO_SPEC and reject is None
            with region("medusa: verify") if guard else contextlib.nullcontext():
                tokens, num_accepted, has = self._medusa_general(hidden_states, input_batch, mode, reject)
                num_sampled, num_rejected = num_sampled_and_rejected(
                    num_accepted, input_batch.seq_lens[:r], cu,
                    self.req_states.prefill_len.gpu[input_batch.idx_mapping])
        self.medusa_stats.observe(num_accepted, has)
        out = SamplerOutput(sampled_token_ids=tokens, logprobs_tensors=self._medusa_logprobs,
                            num_nans=None, num_sampled=num_sampled, num_rejected=num_rejected)
        self._medusa_logprobs = None
        return out, num_sampled, num_rejected

    def _medusa_penalized(self, logits: torch.Tensor, input_batch) -> torch.Tensor:
        """``logits`` [L, V] of the step's rows as V2's sampler processes them before the
        temperature, each tree row as if its path had been accepted: the requests' logit biases
        and allowed tokens (V2's own kernel: they do not depend on the path, and min-tokens'
        positions are the rows' tree positions), then repetition, presence and frequency
        penalties along each row's own path (:mod:`.penalties_v2`), stored back in the logits'
        dtype as V2's in-place kernels store them. ``logits`` itself when no request has any."""
        idx_np = input_batch.idx_mapping_np
        if self.sampler.logit_bias_state.use_logit_bias[idx_np].any():
            logits = logits.clone()
            self.sampler.logit_bias_state.apply_logit_bias(
                logits, input_batch.expanded_idx_mapping, idx_np,
                input_batch.positions[input_batch.logits_indices])
        state = self.sampler.penalties_state
        if not any_penalty(state, idx_np):
            return logits
        rs = self.req_states
        width = min(int(input_batch.seq_lens_cpu_upper_bound[: input_batch.num_reqs].max()) + 1,
                    rs.all_token_ids.gpu.shape[1])
        pen = v2_penalties(state, rs.all_token_ids.gpu, rs.total_len.gpu, input_batch.idx_mapping, width,
                           logits.shape[1])
        return packed_tree_logits(logits, input_batch.input_ids[input_batch.logits_indices],
                                  input_batch.cu_num_logits, input_batch.expanded_local_pos,
                                  self._medusa_req_tree[input_batch.idx_mapping], self.medusa_trees,
                                  pen).to(logits.dtype)

    def _medusa_sampling(self, input_batch) -> SamplingBatch:
        """The step's sampling parameters from vLLM's V2 sampling state (per request slot)."""
        st = self.sampler.sampling_states
        idx, idx_np = input_batch.idx_mapping, input_batch.idx_mapping_np
        min_p = st.min_p.gpu[idx] if bool((st.min_p.np[idx_np] > 0).any()) else None
        # (filtered: the sampled step's graph set with the filters, min-p among them)
        filtered = bool((st.top_k.np[idx_np] < st.vocab_size).any() or (st.top_p.np[idx_np] < 1.0).any()
                        or min_p is not None)
        return SamplingBatch(st.temperature.gpu[idx], st.top_k.gpu[idx].long(), st.top_p.gpu[idx], None,
                             filtered, min_p, keys=self._medusa_keys(input_batch))

    def _medusa_keys(self, input_batch) -> torch.Tensor:
        """[R, 2] int64 (seed, counter) of the step's requests, from which the verification's
        random numbers are hashed (``keyed_uniforms``): vLLM V2's per-request seed (its own for a
        seeded request, a random one otherwise) and the request's computed-token count, which
        grows every step, so a request draws fresh numbers each step and the same ones wherever
        it sits in the batch (vLLM's convention for seeded requests). Device tensors: no sync."""
        r = input_batch.num_reqs
        qsl = input_batch.query_start_loc[: r + 1]
        computed = input_batch.seq_lens[:r] - (qsl[1:] - qsl[:-1])
        seeds = self.sampler.sampling_states.seeds.gpu[input_batch.idx_mapping]
        return torch.stack([seeds.long(), computed.long()], dim=1)

    def _medusa_path_logprobs(self, raw: torch.Tensor, input_batch, accepted: torch.Tensor,
                              tokens: torch.Tensor):
        """V2's logprobs of every emitted token (vLLM's raw modes: the request speculates only
        with those, ``v2_mode``), or None when no request asked: each from the raw logits of
        the row that produced it (the root's for the first token, each accepted node's for the
        next), ``R`` blocks of ``D+1`` rows that V2's output side slices per request by its
        emitted count. ``raw`` [L, V] packed rows, ``accepted`` [R, D] node offsets (-1 pad),
        ``tokens`` [R, D+1] (-1 pad)."""
        n = self.sampler.sampling_states.max_num_logprobs(input_batch.idx_mapping_np)
        if n == NO_LOGPROBS:
            return None
        r, w = tokens.shape
        rows = path_rows(input_batch.cu_num_logits, accepted)
        return compute_topk_scores(raw[rows], n, tokens.flatten().clamp_min(0), list(range(0, r * w + 1, w)),
                                   logits_mode=self.sampler.logprobs_mode == "raw_logits")

    def _medusa_general(self, hidden_states, input_batch, mode: int, reject: np.ndarray | None = None):
        """Any step with drafts: (tokens [R, D+1] int64, num_accepted [R], has [R] bool).
        ``reject`` [R] bool: requests whose drafts are rejected and whose token is vLLM's
        sampler's (their options are not reproduced on tree rows)."""
        r = input_batch.num_reqs
        cu = input_batch.cu_num_logits
        hidden = hidden_states[input_batch.logits_indices]  # [L, H] rows of the logits
        raw = self.model.compute_logits(hidden)
        # (a step that speculates nothing leaves the penalties to vLLM's sampler, on raw logits)
        logits = self._medusa_penalized(raw, input_batch) if mode != V2_NO_SPEC else raw
        tokens_in = input_batch.input_ids[input_batch.logits_indices]
        tree_ids = self._medusa_req_tree[input_batch.idx_mapping]
        if mode == V2_SAMPLED:
            q = self.medusa_max_query
            rows, valid = slot_rows(cu, q, logits.shape[0])
            cfg = self.medusa_cfg
            out = verify(cfg.acceptance, logits, torch.where(valid, rows, -1), tokens_in[rows[:, 1:]].long(),
                         valid.sum(dim=1) - 1, tree_ids, self.medusa_trees, self._medusa_sampling(input_batch),
                         eps=cfg.typical_eps, delta=cfg.typical_delta)
            last_row = cu[:-1].long() + out.last_node
        else:
            out, last_row = greedy_packed(logits.argmax(dim=-1), tokens_in, cu, tree_ids, self.medusa_trees)
        has = (cu[1:] - cu[:-1]) > 1
        if mode == V2_NO_SPEC or reject is not None:
            if not self._medusa_fallback_warned:
                self._medusa_fallback_warned = True
                logger.warning("medusa_vllm (V2 runner): a request's options are not reproduced on tree rows "
                               "(bad words, min_tokens, logprob_token_ids, processed logprobs, ...); its "
                               "drafts are rejected and its tokens come from vLLM's sampler (the whole "
                               "step's, when such a request asks for logprobs)")
            root = self.sampler(raw[cu[:-1].long()], _root_batch(input_batch))
        if mode == V2_NO_SPEC:
            out, last_row = reject_all(out, root.sampled_token_ids[:, 0], cu)
            self._medusa_logprobs = root.logprobs_tensors
            has = torch.zeros_like(has)
        else:
            if reject is not None:
                sel = _to_device(torch.from_numpy(reject), cu.device)
                out, last_row = reject_rows(out, last_row, sel, root.sampled_token_ids[:, 0], cu)
                has = has & ~sel
            self._medusa_logprobs = self._medusa_path_logprobs(raw, input_batch, out.accepted, out.tokens)
        self._medusa_move_kv(self._medusa_slots, input_batch.query_start_loc[: r + 1], out.accepted.int())
        self._medusa_next = self._medusa_next_drafts(hidden[last_row])
        return out.tokens.long(), out.num_accepted, has

    def _medusa_uniform_fn(self, k: int):
        """A uniform step of tree k as one fixed-shape function (CUDA graph per batch size): B
        requests, each 1 + nodes rows (root + every node): verify, move the accepted KV, draft
        tree k again; outputs :meth:`_medusa_finish`'s, then the heads' top-k and finite flags."""
        q = 1 + self.medusa_tree_sizes[k]

        def step(argmax, tokens_in, hidden, slots=None):
            b = argmax.shape[0] // q
            heads = []
            out = greedy_tree_step(argmax, uniform_drafts(tokens_in, b, q), hidden, self._medusa_tree_ids[k][:b],
                                   self.medusa_trees, lambda h: self._medusa_head_drafts(h, k, heads))
            return (*self._medusa_finish(out, b, q, slots), *heads)

        return step

    def _medusa_sampled_fn(self, k: int, filtered: bool):
        """A uniform step of tree k with sampled requests (greedy ones: :func:`verify`) as one
        fixed-shape function of the logits and the step's random numbers: verify, move the
        accepted KV, draft tree k again (outputs as :meth:`_medusa_uniform_fn`'s)."""
        q = 1 + self.medusa_tree_sizes[k]
        cfg = self.medusa_cfg

        def step(logits, drafts, hidden, tree_ids, params, keys, slots=None):
            b = tree_ids.shape[0]
            heads = []
            out = sampled_tree_step(logits, drafts, hidden, tree_ids, params, keys, self.medusa_trees,
                                    lambda h: self._medusa_head_drafts(h, k, heads), cfg.acceptance, filtered,
                                    cfg.typical_eps, cfg.typical_delta)
            return (*self._medusa_finish(out, b, q, slots), *heads)

        return step

    def _medusa_finish(self, out, b: int, q: int, slots: torch.Tensor) -> tuple:
        """The end of a uniform step's function: move each request's accepted KV (its window of
        ``q`` rows in ``slots``; -1: none; ``slots`` None: no move, as before the KV cache
        exists), then (tokens, accepted count, V2's emitted and rejected counts per request, the
        accepted nodes, the next drafts)."""
        if slots is not None:
            starts = torch.arange(0, (b + 1) * q, q, dtype=torch.int32, device=slots.device)
            self._medusa_move_kv(slots, starts, out.accepted)
        num_sampled = (out.num_accepted + 1).int()
        return out.tokens.long(), out.num_accepted, num_sampled, q - num_sampled, out.accepted, out.drafts

    def _medusa_move_kv(self, slot_mapping, query_start_loc, accepted) -> None:
        if self._medusa_kv_views is None:
            backend = self.attn_groups[0][0].backend
            self._medusa_kv_views = [backend.kv_views(kv) for kv in self.kv_caches]
        k_caches, v_caches = zip(*self._medusa_kv_views)
        kernels.move_accepted_kv(list(k_caches), list(v_caches), slot_mapping, query_start_loc, accepted,
                                 check=not self._medusa_kv_checked)
        self._medusa_kv_checked = True

    # ------------------------------------------------------------------ drafting
    def _medusa_head_drafts(self, hidden: torch.Tensor, k: int, keep: list | None = None) -> torch.Tensor:
        """[B, H] -> [B, Q-1] int64 drafts of tree k (BFS), zero past its nodes; non-finite head
        logits give token 0 (fed to the next forward as is, rejected in practice: exact).
        ``keep``: gets the heads' (top-k [B, K, topk], finite [B]), which a uniform step's
        function returns, so drafts of another tree can be gathered from them when the
        scheduler changes the draft count (:meth:`sample`)."""
        topk, finite = self.speculator.proposer.head_topk(hidden, self.medusa_cfg.topk)
        if keep is not None:
            keep.extend((topk, finite))
        return self._medusa_tree_drafts(topk, finite, k)

    def _medusa_tree_drafts(self, topk: torch.Tensor, finite: torch.Tensor, k: int) -> torch.Tensor:
        """The heads' top-k [B, K, topk] and finite [B] -> [B, Q-1] int64 drafts of tree k."""
        size = self.medusa_tree_sizes[k]
        drafts = topk[:, self._medusa_head_idx[k, :size], self._medusa_rank_idx[k, :size]]
        drafts = torch.where(finite[:, None], drafts, 0)
        pad = self.medusa_max_query - 1 - size
        return torch.nn.functional.pad(drafts, (0, pad)) if pad else drafts

    def _medusa_next_drafts(self, hidden: torch.Tensor):
        """(tree, drafts [B, Q-1]) for the next step: the tree of the draft count vLLM's
        scheduler reserved (no heads at all for none)."""
        k = self.medusa_policy.tree_of_num_drafts(self._medusa_sched)
        if k == NO_TREE:
            return NO_TREE, self._medusa_no_drafts[: hidden.shape[0]]
        return k, self._medusa_head_drafts(hidden, k)

    def _medusa_propose(self, input_batch, hidden_states, dummy_run: bool) -> torch.Tensor:
        nxt, self._medusa_next = self._medusa_next, None
        if dummy_run or nxt is None:
            # no drafts verified this step (prefill, a step without drafts, a dummy run): one
            # logits row per request, at its last token
            last = hidden_states[input_batch.logits_indices[: input_batch.num_reqs]]
            if dummy_run:  # profiling and warm-up: the heads' cost and memory, no state
                return self._medusa_head_drafts(last, self._medusa_largest)
            nxt = self._medusa_next_drafts(last)
        k, drafts = nxt
        idx = input_batch.idx_mapping_np
        if not (self._medusa_tree_np[idx] == k).all():  # the slots' record of their drafts' tree
            self._medusa_tree_np[idx] = k
            if k != NO_TREE:
                self._medusa_req_tree.index_fill_(0, input_batch.idx_mapping.long(), k)
        return drafts


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``x`` on ``device`` without a host sync (a pinned, non-blocking copy to a GPU)."""
    return async_copy_to_gpu(x, device=device) if device.type == "cuda" else x.to(device)


def _root_batch(input_batch):
    """The step's input batch seen through each request's root row only (vLLM's sampler: one
    logits row per request, with all its sampling options)."""
    r = input_batch.num_reqs
    cu = input_batch.cu_num_logits
    return dataclasses.replace(
        input_batch,
        expanded_idx_mapping=input_batch.idx_mapping,
        expanded_local_pos=torch.zeros(r, dtype=torch.int32, device=cu.device),
        logits_indices=input_batch.logits_indices[cu[:-1].long()],
        cu_num_logits=torch.arange(r + 1, dtype=torch.int32, device=cu.device),
        cu_num_logits_np=np.arange(r + 1, dtype=np.int32),
    )
