"""medusa_vllm's model runner: vLLM's V1 runner (GPU or CPU) with Medusa trees.

One step, as vLLM drives it (``execute_model`` then ``sample_tokens``):

1. ``_prepare_inputs``: vLLM lays out ``[root, n tree nodes]`` per decoding request with linear
   positions and slots; we add ``depth - index`` to the positions of tree nodes (RoPE sees
   ``base + depth``) and tell the attention builders which leading requests are tree decodes.
2. forward: tree attention for those (:mod:`.attention`), vLLM's backend for the rest.
3. ``_sample``: verify every request's tree against the target logits (greedy / lossless
   rejection / typical, :mod:`medusa_vllm.verify`), emit accepted path + one token, then move the
   accepted nodes' KV into the consecutive slots vLLM's bookkeeping expects — so vLLM's own
   rollback of ``n - accepted`` tokens stays correct. Requests without drafts are sampled by
   vLLM's sampler (all its features: penalties, logprobs, …). Right after, the next drafts: the
   heads read the hidden state of each request's last accepted token; top-k per head; the tree's
   tokens are gathered by (head, rank) — all on the device. A uniform greedy step does both in
   one fixed-shape function (:mod:`medusa_vllm.graphed_step`, a CUDA graph on one GPU).
   Repetition, presence and frequency penalties, logit biases and allowed-token lists enter
   verification per tree row: the request's output plus the row's path (:mod:`.penalties`), as
   vLLM's sampler would see it had that path been accepted; min-p enters the target
   distribution after the temperature, as in vLLM's sampler.
4. ``propose_draft_token_ids`` returns those drafts; vLLM hands them to the scheduler as each
   request's speculative tokens (BFS order) or, under asynchronous scheduling, copies them into
   the next step's inputs on the device.

Requests that speculation cannot serve exactly (bad words, min_tokens,
structured output, logprob_token_ids, logprobs in vLLM's "processed" logprobs modes) get no
drafts and decode normally; under asynchronous scheduling they get draft slots, but vLLM's
sampler gives their token and their drafts are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import DraftTokenIds, LogprobsTensors, SamplerOutput
from vllm.v1.utils import record_function_or_nullcontext
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from medusa_vllm import kernels
from medusa_vllm.adaptive import NO_TREE, AdaptiveTreePolicy
from medusa_vllm.graphed_step import sampling_params_tensor
from medusa_vllm.sampling import SamplingBatch, StepRandomness
from medusa_vllm.tree_tensors import TreeTensors, causal_masks
from medusa_vllm.verify import verify
from medusa_vllm.vllm_plugin.attention import MedusaAttnContext, TreeAttnStep
from medusa_vllm.vllm_plugin.compile_warmup import warm_batch_change_compiles
from medusa_vllm.vllm_plugin.config import MedusaConfigError, MedusaSpecConfig
from medusa_vllm.vllm_plugin.graphs import KV_MOVE_IN_GRAPH, MedusaGraphsMixin
from medusa_vllm.vllm_plugin.penalties import check_tree_logits, min_p_of, needs_tree_processing, tree_logits
from medusa_vllm.vllm_plugin.step import (
    can_speculate, plan_step, position_offsets, step_trees, uniform_tree,
)
from medusa_vllm.vllm_plugin.step_cache import (
    PinnedUpload, UniformStepCache, copy_uniform_input_ids, uniform_drafts,
)
from medusa_vllm.vllm_plugin.top_k_top_p import sampling_ops

logger = init_logger(__name__)


# MEDUSA_VLLM_SYNC_DEBUG=1 (or "warn"): medusa_vllm's parts of a step (plan, verification, KV
# move, heads) run under torch.cuda.set_sync_debug_mode("error") (or "warn"), so a host sync that
# sneaks in raises (or warns)
SYNC_DEBUG = {"1": "error", "error": "error", "warn": "warn"}.get(
    os.environ.get("MEDUSA_VLLM_SYNC_DEBUG", ""))
# MEDUSA_VLLM_GRAPH_CHECK=N: the first N tree steps that replay a FULL CUDA graph run the model a
# second time eagerly on the same inputs and log the largest difference of the hidden states
# (root rows and tree rows apart): a graph that reads a stale buffer shows up here
GRAPH_CHECK = int(os.environ.get("MEDUSA_VLLM_GRAPH_CHECK", "0") or 0)
# MEDUSA_VLLM_CHECK_PENALTIES=1: every step with penalties or allowed-token lists recomputes its
# tree rows' logits with vLLM's own apply_penalties from each row's history spelled out and
# raises on any difference (host syncs; tests)
CHECK_PENALTIES = os.environ.get("MEDUSA_VLLM_CHECK_PENALTIES", "") not in ("", "0")


@contextlib.contextmanager
def region(name: str):
    """A profiler region of the step (vLLM's scopes) that, with SYNC_DEBUG, forbids host syncs."""
    with record_function_or_nullcontext(name):
        if not (SYNC_DEBUG and torch.cuda.is_available()):
            yield
            return
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(SYNC_DEBUG)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)


def _attention_backend(choice: str, vllm_config, device) -> str:
    """The speculative config's ``attention`` -> the backend the attention impls run: "kernel"
    (``kernels.tree_attention``: the compiled kernel, or the reference ops without the
    extension), "reference" or "xformers"; errors for a choice that cannot run here."""
    if choice == "kernel" and not kernels.have_extension():
        raise MedusaConfigError(
            f"medusa_vllm: attention 'kernel' needs the compiled extension, which did not load "
            f"({kernels.extension_error()}); build it or use attention 'auto'"
        )
    if choice in ("reference", "xformers") and not vllm_config.model_config.enforce_eager:
        raise MedusaConfigError(
            f"medusa_vllm: attention {choice!r} syncs the host in every layer and cannot run in "
            f"CUDA graphs or torch.compile; pass enforce_eager=True (--enforce-eager) with it"
        )
    if choice == "xformers":
        from medusa_vllm.kernels.xformers_tree import XformersUnavailable, load

        if device.type != "cuda":
            raise MedusaConfigError(
                f"medusa_vllm: attention 'xformers' runs xformers' Triton kernels, GPU only "
                f"(this engine runs on {device.type}); use 'auto'"
            )
        try:
            load()
        except XformersUnavailable as exc:
            raise MedusaConfigError(str(exc)) from exc
    return choice if choice in ("reference", "xformers") else "kernel"


class MedusaRunnerMixin(MedusaGraphsMixin):
    """Overrides on top of vLLM 0.26's V1 ``GPUModelRunner`` (shared by its CPU subclass)."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self.medusa_cfg = MedusaSpecConfig.from_dict(vllm_config.additional_config["medusa_vllm"])
        self.medusa_sampling_ops = sampling_ops(self.device, vllm_config.model_config.get_vocab_size())
        trees = self.medusa_cfg.trees
        self.medusa_max_query = 1 + self.num_spec_tokens
        self.medusa_trees = TreeTensors.build(trees, self.device, q_max=self.medusa_max_query)
        self.medusa_tree_sizes = [len(t) for t in trees]
        self.medusa_offsets = position_offsets(trees)
        masks = torch.cat([causal_masks(self.medusa_max_query), self.medusa_trees.masks.cpu()])
        self.medusa_attn = MedusaAttnContext(
            kernels.pack_tree_masks(masks).to(self.device), self.max_num_reqs,
            backend=_attention_backend(self.medusa_cfg.attention, vllm_config, self.device),
        )
        self._medusa_mask_ids_np = np.zeros(self.max_num_reqs, dtype=np.int32)
        self._medusa_ids_sliced = False  # this step's input ids came by slice copies
        # the plan of a step: one pinned copy (positions, masks, 3 per-request arrays); a uniform
        # step (every request verifies one whole tree) reads per-batch-size device tensors
        self._medusa_upload = PinnedUpload(self.max_num_tokens + 4 * self.max_num_reqs, self.device)
        sizes = self.medusa_tree_sizes
        # what each step ran, per draft count (diagnostics: medusa_stats()["step_paths"])
        self.medusa_paths = StepPaths()
        # which (head, rank) each node of each tree reads: [NT, Tmax]
        self.medusa_head_idx = (self.medusa_trees.depths[:, 1:] - 1).clamp_min(0)
        self.medusa_rank_idx = self.medusa_trees.ranks[:, 1:].clamp_min(0)
        self.medusa_policy = AdaptiveTreePolicy(
            trees, self.medusa_cfg.adaptive, self.medusa_cfg.adaptive_max_tokens, self.device.type
        )
        # adaptive + async scheduling: vLLM's dynamic speculative decoding reserves the policy's
        # draft count per batch size (its schedule, set by the plugin's config rewrite); the
        # runner proposes the tree of the count the scheduler chose for this step
        self._medusa_dynamic = bool(
            getattr(self.speculative_config, "num_speculative_tokens_per_batch_size", None))
        if self.use_async_scheduling and not self._medusa_dynamic:
            # vLLM schedules num_speculative_tokens draft slots for every decode: the full tree
            self.medusa_policy.enabled = False
        self._medusa_sched_drafts = self.num_spec_tokens  # this step's num_spec_tokens_to_schedule
        self._medusa_emitted: torch.Tensor | None = None  # this step's tokens (async hand-over)
        # a uniform step's (last token, emitted count) [B] int32 each, from its function
        self._medusa_handover: tuple[torch.Tensor, torch.Tensor] | None = None
        self._medusa_graph_checks = 0  # FULL-graph steps re-run eagerly so far (GRAPH_CHECK)
        self._medusa_penalty_rows = 0  # penalized tree rows checked so far (CHECK_PENALTIES)
        self._medusa_masks_set = False  # mask_ids may hold nonzero ids (a plan wrote them)
        self._medusa_req_tree: dict[str, int] = {}
        self._medusa_ok: dict[str, bool] = {}
        self._medusa_nan_warned: set[str] = set()
        self._medusa_step: dict | None = None
        self._medusa_hidden: torch.Tensor | None = None
        self._medusa_drafts: torch.Tensor | None = None
        self._medusa_proposed = False
        self._medusa_kv_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._medusa_kv_checked = False
        self._medusa_compiles_warm = False  # vLLM's async spec-decode helper compiled (once)
        self.medusa_stats = MedusaStats(max(t.depth for t in trees), self.device)
        # uniform greedy steps (every request verifies tree k whole): verification + next drafts
        # as one function of fixed shapes, replayed from a CUDA graph per batch size on the GPU
        # (captured in capture_model; single rank: the heads' logits gather is a collective under
        # TP); plain code on the CPU. One set per tree the engine may verify: the main tree, and
        # with the load-adaptive tree each of its sizes
        graph_trees = self.medusa_policy.order if self.medusa_cfg.adaptive else [int(np.argmax(sizes))]
        # the uniform steps' plans, per query length (1 + nodes) of those trees, from a cache (a
        # size two trees share is left out: a step's draft count would not name its tree)
        self._medusa_uniform = {
            1 + sizes[k]: UniformStepCache(k, self.medusa_offsets[k], self.max_num_reqs, self.device)
            for k in graph_trees if sizes.count(sizes[k]) == 1
        }
        self._medusa_init_graphs(graph_trees, vllm_config)

    # ------------------------------------------------------------------ set-up hooks
    def initialize_metadata_builders(self, *args, **kwargs) -> None:
        super().initialize_metadata_builders(*args, **kwargs)
        for group in self._attn_group_iterator():
            builder = group.get_metadata_builder()
            if not hasattr(builder, "medusa"):
                raise RuntimeError(
                    f"medusa_vllm needs its tree attention backend, but vLLM selected "
                    f"{group.backend.get_name()}; do not pass --attention-backend with medusa_vllm"
                )
            builder.medusa = self.medusa_attn
        if self.use_async_spec_decode and not self._medusa_compiles_warm:
            # here, once: after the model, before CUDA graph capture and any step
            self._medusa_compiles_warm = True
            warm_batch_change_compiles(self.num_computed_tokens, self.num_accepted_tokens.gpu,
                                       self.prev_positions.gpu, self.prev_num_draft_tokens.gpu)

    # ------------------------------------------------------------------ FULL graphs per query length

    def _medusa_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._medusa_kv_views is None:
            backend = next(iter(self._attn_group_iterator())).backend
            self._medusa_kv_views = [backend.kv_views(kv) for kv in self.kv_caches]
        return self._medusa_kv_views

    # ------------------------------------------------------------------ per step
    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            self._medusa_req_tree.pop(req_id, None)
            self._medusa_ok.pop(req_id, None)
            self._medusa_nan_warned.discard(req_id)
        return super()._update_states(scheduler_output)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            self.medusa_attn.step = None

    def _dummy_run(self, num_tokens, *args, uniform_decode: bool = False, **kwargs):
        # A uniform-decode dummy batch (1 + tree nodes tokens per request) stands for steps in
        # which every request decodes a tree: the FULL CUDA graphs vLLM captures from it must hold
        # the tree kernel (reading the persistent mask buffer), not vLLM's causal attention. The
        # load-adaptive tree's plain steps (query length 1, no drafts) keep vLLM's own decode
        # attention: such a step is then exactly vLLM's plain decode step.
        if uniform_decode and self.uniform_decode_query_len > 1:
            self.medusa_attn.step = TreeAttnStep.for_capture()
        try:
            return super()._dummy_run(num_tokens, *args, uniform_decode=uniform_decode, **kwargs)
        finally:
            self.medusa_attn.step = None

    def _model_forward(self, *args, **kwargs):
        out = super()._model_forward(*args, **kwargs)
        if self._medusa_graph_checks < GRAPH_CHECK:
            self._medusa_graph_check(out, args, kwargs)
        return out

    def _medusa_graph_check(self, out, args, kwargs) -> None:
        """Re-runs a FULL-graph tree step eagerly: as is, with every mask id 0 (causal) and with
        the tree positions undone, and logs how far the graph's hidden states are from each
        (the last re-run is the correct one, so the KV cache ends as the step wrote it)."""
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        step = self.medusa_attn.step
        if fc.cudagraph_runtime_mode != CUDAGraphMode.FULL or step is None or not step.all_reqs:
            return
        self._medusa_graph_checks += 1
        n = self._medusa_step["num_tokens"]
        q = self.medusa_max_query
        b = n // q

        def hidden(o):
            return (o[0] if isinstance(o, tuple) else o)[:n].float().clone()

        def eager():
            fc.cudagraph_runtime_mode = CUDAGraphMode.NONE
            try:
                return hidden(super(MedusaRunnerMixin, self)._model_forward(*args, **kwargs))
            finally:
                fc.cudagraph_runtime_mode = CUDAGraphMode.FULL

        def gap(a, c):
            d = (a - c).abs().amax(dim=-1).view(b, q)
            return f"roots {d[:, 0].max().item():.3g} tree {d[:, 1:].max().item():.3g}"

        full = hidden(out)
        mask_ids = self.medusa_attn.mask_ids.clone()
        self.medusa_attn.mask_ids.zero_()
        causal = eager()
        self.medusa_attn.mask_ids.copy_(mask_ids)
        delta = torch.from_numpy(self._medusa_plan_delta).to(self.device)
        self.positions[:n] -= delta
        linear = eager()
        self.positions[:n] += delta
        ok = eager()
        logger.warning(
            "medusa_vllm graph check %d (%d tokens): FULL vs eager: %s | vs eager, causal masks: "
            "%s | vs eager, linear positions: %s; seq_lens %s mask_ids %s",
            self._medusa_graph_checks, n, gap(full, ok), gap(full, causal), gap(full, linear),
            self.seq_lens[:b].tolist(), mask_ids[:b].tolist(),
        )

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        logits_indices, spec_meta = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._medusa_sched_drafts = scheduler_output.num_spec_tokens_to_schedule
        with region("medusa: plan"):
            self._medusa_plan(scheduler_output, num_scheduled_tokens)
        return logits_indices, spec_meta

    def _prepare_input_ids(self, scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens):
        if not self._medusa_uniform_input_ids(scheduler_output, num_reqs, total_num_scheduled_tokens):
            super()._prepare_input_ids(scheduler_output, num_reqs, total_num_scheduled_tokens, cu_num_tokens)

    def _medusa_uniform_input_ids(self, scheduler_output, num_reqs: int, total: int) -> bool:
        """Asynchronous scheduling: a step in which every request decoded in the step before, at
        the same row, and now runs ``q - 1`` drafts takes its input ids by two slice copies on the
        device (:func:`copy_uniform_input_ids`) instead of vLLM's per-token index lists (a Python
        loop over every draft slot and four pinned uploads a step: 0.3-0.6 ms of host time at
        batch 8, 1.1 ms at batch 64 with 63 nodes, ``step_log_h100_27b41aa.json``); False (vLLM
        does it) for any other step."""
        prev_sampled = self.input_batch.prev_sampled_token_ids
        drafts = self._draft_token_ids
        q = total // num_reqs if num_reqs else 0
        width = self.prev_num_spec_tokens
        if (prev_sampled is None or self.enable_prompt_embeds or q < 2 or total != num_reqs * q
                or not isinstance(drafts, torch.Tensor) or width < q - 1
                or drafts.numel() < num_reqs * width or prev_sampled.shape[0] < num_reqs):
            return False
        if not np.array_equal(self.prev_positions.np[:num_reqs], self.arange_np[:num_reqs]):
            return False
        spec = scheduler_output.scheduled_spec_decode_tokens
        if not all(len(spec.get(r, ())) == q - 1 for r in self.input_batch.req_ids[:num_reqs]):
            return False
        copy_uniform_input_ids(self.input_ids.gpu, prev_sampled, drafts, width, num_reqs, q)
        self._medusa_ids_sliced = True  # counted in step_paths by the plan, which names the step
        return True

    def _calc_spec_decode_metadata(self, num_draft_tokens, cu_num_scheduled_tokens):
        # a uniform step: vLLM's index tensors of that batch size from the cache (it pins and
        # copies five fresh ones a step otherwise); only the drafts are read anew
        b = len(num_draft_tokens)
        q = int(cu_num_scheduled_tokens[-1]) // b if b else 0
        cache = self._medusa_uniform.get(q)
        if cache is None or cu_num_scheduled_tokens[-1] != b * q or not (num_draft_tokens == q - 1).all():
            return super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        u = cache.get(b)
        if u.spec_meta is None:
            u.spec_meta = super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        return dataclasses.replace(
            u.spec_meta, num_draft_tokens=list(u.spec_meta.num_draft_tokens),
            draft_token_ids=uniform_drafts(self.input_ids.gpu, b, q),
        )

    def _medusa_uniform_plan(self, key: str) -> bool:
        """The plan of a step in which every request decodes the drafts of one whole tree that
        has a cache (the largest; with the load-adaptive tree each size), from the per-batch-size
        cache (no host-to-device copy); False if the step is not such a step. ``key``: the
        step's :func:`_step_key` (every request decoding ``key`` drafts, or "mixed")."""
        cache = self._medusa_uniform.get(1 + int(key)) if key != "mixed" else None
        if cache is None:
            return False
        num_reqs = self.input_batch.num_reqs
        q = cache.q
        req_ids = self.input_batch.req_ids[:num_reqs]
        if self.use_async_scheduling and not all(self._medusa_can_speculate(r) for r in req_ids):
            return False
        k = cache.tree_id
        if self.medusa_tree_sizes[k] != max(self.medusa_tree_sizes):
            # a smaller tree: every request's drafts must follow it (after a change of tree
            # the first step verifies the earlier tree's drafts, cut to this count)
            trees = self._medusa_req_tree
            if not all(trees.get(r) == k for r in req_ids):
                return False
        u = cache.get(num_reqs)
        n_tok = num_reqs * q
        self.positions[:n_tok] += u.position_delta
        self.medusa_attn.mask_ids.copy_(u.mask_ids)
        self.medusa_attn.step = TreeAttnStep(num_reqs, n_tok, all_reqs=True)
        self._medusa_plan_delta = u.position_delta_np
        self._medusa_step = {
            "uniform_tree": k, "spec_ok": u.spec_ok, "spec_ok_np": u.spec_ok_np,
            "num_drafts": u.num_drafts, "tree_ids": u.tree_ids, "num_tokens": n_tok,
        }
        return True

    def _medusa_plan(self, scheduler_output, num_scheduled_tokens) -> None:
        paths = self.medusa_paths
        paths.key = _step_key(num_scheduled_tokens, self.input_batch, scheduler_output)
        if self._medusa_ids_sliced:
            self._medusa_ids_sliced = False
            paths.count("input ids sliced")
        if self._medusa_uniform_plan(paths.key):
            self._medusa_masks_set = True
            paths.count("plan cached")
            return
        if not any(scheduler_output.scheduled_spec_decode_tokens.values()):
            # no drafts anywhere (the load-adaptive tree chose none, or nothing was proposed):
            # vLLM's plain step, no plan; mask ids back to 0 for FULL graphs holding the tree
            # kernel (a batch of prefill chunks of a tree's query length replays one)
            self._medusa_step = None
            self.medusa_attn.step = None
            if self._medusa_masks_set:
                self.medusa_attn.mask_ids.zero_()
                self._medusa_masks_set = False
            return
        self._medusa_masks_set = True
        paths.count("plan built")
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        spec = scheduler_output.scheduled_spec_decode_tokens
        num_drafts = np.array([len(spec.get(r, ())) for r in req_ids], dtype=np.int64)
        recorded = np.fromiter((self._medusa_req_tree.get(r, -1) for r in req_ids), dtype=np.int64, count=num_reqs)
        sizes = np.asarray(self.medusa_tree_sizes)
        tree_ids = step_trees(num_drafts, recorded, sizes, int(np.argmax(sizes)))
        done_prefill = (
            self.input_batch.num_computed_tokens_cpu[:num_reqs]
            >= self.input_batch.num_prompt_tokens[:num_reqs]
        )
        plan = plan_step(
            np.asarray(num_scheduled_tokens, dtype=np.int64), num_drafts, tree_ids, done_prefill,
            self.medusa_offsets, self.medusa_max_query,
        )
        n_tok = len(plan.position_delta)
        self._medusa_plan_delta = plan.position_delta
        # masks into the persistent buffer (zeros past the batch: CUDA-graph padding)
        mask_np = self._medusa_mask_ids_np
        mask_np[:num_reqs] = plan.mask_ids
        mask_np[num_reqs:] = 0
        # which requests' drafts are verified: all that have drafts, except (async scheduling,
        # where vLLM schedules draft slots for every decode) those whose sampling options
        # speculation cannot reproduce: their token comes from vLLM's sampler
        spec_ok = num_drafts > 0
        if self.use_async_scheduling:
            spec_ok &= np.array([self._medusa_can_speculate(r) for r in req_ids], dtype=bool)
        delta, masks, ok, drafts, trees = self._medusa_upload(
            plan.position_delta, mask_np, spec_ok, num_drafts, plan.tree_ids)
        if num_drafts.any():
            self.positions[:n_tok] += delta
        self.medusa_attn.mask_ids.copy_(masks)
        self.medusa_attn.step = TreeAttnStep(plan.num_tree_reqs, plan.num_tree_tokens, plan.all_reqs)
        self._medusa_step = {
            # every request verifies the same whole tree: the fixed-shape step of that tree applies
            "uniform_tree": uniform_tree(plan, spec_ok, num_drafts, self.medusa_tree_sizes),
            "spec_ok": ok != 0,
            "spec_ok_np": spec_ok,
            "num_drafts": drafts,
            "tree_ids": trees,
            "num_tokens": n_tok,
        }

    def sample_tokens(self, grammar_output):
        state = self.execute_model_state
        self._medusa_hidden = None
        if state is not None:
            self._medusa_hidden = state.sample_hidden_states  # [R, H], rows of `logits`
            if self._medusa_step is not None:
                slots = state.slot_mappings
                if isinstance(slots, list):
                    slots = slots[0]
                self._medusa_step["slot_mapping"] = next(iter(slots.values())) if slots else None
        self._medusa_drafts = None
        self._medusa_proposed = False
        return super().sample_tokens(grammar_output)

    def _sample(self, logits, spec_decode_metadata):
        self._medusa_handover = None
        out = self._medusa_sample_step(logits, spec_decode_metadata)
        self._medusa_emitted = out.sampled_token_ids if spec_decode_metadata is not None else None
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        # Asynchronous scheduling: the next step's inputs come from the device — the last token
        # each request emitted (its next root) and how many it emitted (vLLM corrects its
        # optimistic token counts with it), handed over as vLLM's EAGLE path does
        # (a uniform step's function computed both: _medusa_handover)
        emitted, handed = self._medusa_emitted, self._medusa_handover
        self._medusa_emitted = self._medusa_handover = None
        if self.use_async_scheduling and emitted is not None:
            if handed is not None:
                last, counts = handed  # [B] int32 each
            else:
                counts = (emitted >= 0).sum(dim=1).int()  # [B] accepted + 1 (0: discarded request)
                last = emitted.gather(1, (counts.long() - 1).clamp_min(0)[:, None]).squeeze(1).int()
            self._copy_valid_sampled_token_count(last, counts)
            if self.valid_sampled_token_count_event is None:  # vLLM skips the hand-over then
                self.valid_sampled_token_count_gpu = counts
                self.input_batch.prev_sampled_token_ids = last[:, None]
        return super()._bookkeeping_sync(*args, **kwargs)

    def _medusa_sample_step(self, logits, spec_decode_metadata):
        if spec_decode_metadata is None or self._medusa_step is None:
            out = super()._sample(logits, spec_decode_metadata)
            rows = None  # one logits row per request, in order
        elif self._medusa_uniform_applies(logits):
            greedy = self.input_batch.sampling_metadata.all_greedy
            self.medusa_paths.count("verify fixed-shape" if greedy else "verify fixed-shape sampled")
            with region("medusa: verify+heads"):
                return self._medusa_uniform_sample(logits, spec_decode_metadata, greedy)
        else:
            self.medusa_paths.count("verify general")
            with region("medusa: verify"):
                out, rows = self._medusa_sample(logits, spec_decode_metadata)
        # the next drafts right away (the hidden state of each request's last accepted token):
        # the GPU computes them while the host does vLLM's bookkeeping
        if self._medusa_hidden is not None and self.drafter.heads is not None:
            with region("medusa: heads"):
                self._medusa_drafts = self._medusa_propose(self._medusa_hidden, rows)
        return out

    def _medusa_uniform_applies(self, logits) -> bool:
        """Every request verifies tree k whole and the fixed-shape function of tree k applies
        (greedy, or with sampled requests among them)."""
        step = self._medusa_step
        num_reqs = self.input_batch.num_reqs
        k = step["uniform_tree"]
        return (
            k in self._medusa_graphs
            and self._medusa_hidden is not None
            and self.drafter.heads is not None
            and step.get("slot_mapping") is not None
            and logits.shape[0] == num_reqs * (1 + self.medusa_tree_sizes[k])
        )

    def _medusa_uniform_sample(self, logits, spec_decode_metadata, greedy: bool):
        """A step in which every request verified its full tree: one fixed-shape function (a
        CUDA graph replay on the GPU) verifies, picks the accepted path, moves its KV and
        drafts the next tree; then the stats count. With sampled requests the step's random
        numbers are drawn first (their own generators for seeded requests) and handed in."""
        num_reqs = self.input_batch.num_reqs
        step = self._medusa_step
        k = step["uniform_tree"]
        slots = step["slot_mapping"][: step["num_tokens"]]
        in_graph = (slots,) if KV_MOVE_IN_GRAPH else ()  # the KV move's input, when in the graph
        drafts_in = spec_decode_metadata.draft_token_ids
        target = self._medusa_tree_logits(logits, step["num_drafts"], drafts_in.view(num_reqs, -1), step["tree_ids"])
        if greedy:
            out = self._medusa_graphs[k](target.argmax(dim=-1), drafts_in, self._medusa_hidden,
                                         step["tree_ids"], *in_graph)
        else:
            sampling = _sampling_batch(self.input_batch.sampling_metadata, num_reqs, logits.device)
            trees = self.medusa_trees
            rand = StepRandomness.draw(num_reqs, trees.max_depth + 1, trees.children.shape[2], sampling,
                                       logits.device)
            out = self._medusa_sampled_graphs[(k, sampling.filtered)](
                target, drafts_in, self._medusa_hidden, step["tree_ids"], sampling_params_tensor(sampling),
                rand.flat(), *in_graph)
        tokens, accepted, num_accepted, last, counts, drafts, topk, finite = out
        if self.use_async_scheduling:  # for _bookkeeping_sync; copies, as the drafts below
            self._medusa_handover = (last.clone(), counts.clone())
        if not KV_MOVE_IN_GRAPH:
            self._medusa_move_kv(slots, self.query_start_loc.gpu[: num_reqs + 1], accepted)
        self.medusa_stats.observe(num_accepted, step["spec_ok"])
        nxt = self._medusa_next_tree(num_reqs)
        drafted = self._medusa_graph_drafted(k)
        if nxt != drafted:
            # the next drafts follow another tree (the measured adaptive tree changed its
            # choice; the budget rule: its graphs draft their captured batch size's tree):
            # gathered from the same heads' top-k, a new tensor
            if drafted is not None:
                self.medusa_paths.count("next tree changes")
            self._medusa_drafts = self._medusa_tree_drafts(topk, finite, nxt)
        else:
            # the graph's output, read by take_draft_token_ids this step; under async scheduling
            # vLLM also copies it on a side stream that the next replay does not wait for: a copy
            self._medusa_drafts = drafts.clone() if self.use_async_scheduling else drafts
        logprobs = None
        if self.input_batch.sampling_metadata.max_num_logprobs is not None:
            rows = torch.arange(logits.shape[0], device=logits.device).view(num_reqs, -1)  # [B, Q]
            logprobs = self._medusa_logprobs(logits, rows, accepted, tokens)
        # a copy: vLLM may hold the sampled ids past the next replay
        return SamplerOutput(sampled_token_ids=tokens.clone(), logprobs_tensors=logprobs)


    def _medusa_graph_next_tree(self, k: int, num_reqs: int) -> int:
        """The next tree the uniform-step function of tree k drafts: with the measured adaptive
        rule, the same tree (its steady state); otherwise the budget rule's (the main tree when
        the policy is off)."""
        if self.medusa_cfg.adaptive and self.medusa_cfg.adaptive_policy == "measured":
            return k
        return self.medusa_policy.static_choice(num_reqs)

    def _medusa_graph_drafted(self, k: int) -> int | None:
        """The tree whose drafts the uniform function of tree k returns whatever the batch size
        (None: it depends on the captured batch size that served the step: the budget rule)."""
        cfg = self.medusa_cfg
        if cfg.adaptive and cfg.adaptive_policy != "measured":
            return None
        return self._medusa_graph_next_tree(k, 1)

    def _medusa_peek_next_tree(self, num_reqs: int) -> int:
        """The tree :meth:`_medusa_next_tree` will record for the next drafts."""
        if self._medusa_dynamic:
            return self.medusa_policy.tree_of_num_drafts(self._medusa_sched_drafts)
        return self.medusa_policy.choose(num_reqs)

    def _medusa_sample(self, logits, spec_decode_metadata):
        step = self._medusa_step
        num_reqs = self.input_batch.num_reqs
        sm = self.input_batch.sampling_metadata
        n = step["num_drafts"]  # [B]
        q = self.medusa_max_query
        cu = spec_decode_metadata.cu_num_sampled_tokens  # [B] end of each request's rows
        first = (cu - n - 1).long()  # [B] logits row of each root
        slots = torch.arange(q, device=logits.device)
        row_of_node = torch.where(slots[None, :] <= n[:, None], first[:, None] + slots[None, :], -1)
        # plain sampling (all of vLLM's options) of each root: the token of requests w/o drafts
        all_drafted = bool(step["spec_ok_np"].all())
        base = None
        if not all_drafted:
            self.input_batch.update_async_output_token_ids()
            # top-k logprobs come from _medusa_logprobs, for every request: not twice
            base_sm = sm if sm.max_num_logprobs is None else dataclasses.replace(sm, max_num_logprobs=None)
            base = self.sampler(logits=logits[first], sampling_metadata=base_sm)
        # drafts as scheduled (flat, per request in batch order) -> [B, Q-1]
        flat = spec_decode_metadata.draft_token_ids
        starts = (spec_decode_metadata.cu_num_draft_tokens - n).long()
        pos = (starts[:, None] + slots[None, : q - 1]).clamp(0, max(flat.shape[0] - 1, 0))
        drafts = flat[pos].long() if flat.numel() else torch.zeros_like(pos)
        sampling = None if sm.all_greedy else _sampling_batch(sm, num_reqs, logits.device)
        out = verify(
            self.medusa_cfg.acceptance, self._medusa_tree_logits(logits, n, drafts, step["tree_ids"]),
            row_of_node, drafts, n, step["tree_ids"],
            self.medusa_trees, sampling, all_greedy=sm.all_greedy,
            eps=self.medusa_cfg.typical_eps, delta=self.medusa_cfg.typical_delta,
        )
        has = step["spec_ok"]
        width = out.tokens.shape[1]
        hidden_rows = row_of_node.gather(1, out.last_node[:, None]).squeeze(1)  # [B]
        tokens, accepted = out.tokens, out.accepted
        if base is not None:
            plain = torch.full_like(out.tokens, -1)
            plain[:, 0] = base.sampled_token_ids[:, 0].long()
            tokens = torch.where(has[:, None], out.tokens, plain)
            accepted = torch.where(has[:, None], out.accepted, torch.full_like(out.accepted, -1))
            hidden_rows = torch.where(has, hidden_rows, first)
        if bool(step["spec_ok_np"].any()) and step.get("slot_mapping") is not None:
            self._medusa_move_kv(step["slot_mapping"][: step["num_tokens"]],
                                 self.query_start_loc.gpu[: num_reqs + 1], accepted.int())
        self.medusa_stats.observe(out.num_accepted, has)
        if sm.max_num_logprobs is not None:  # every emitted token's, drafted requests' too
            logprobs = self._medusa_logprobs(logits, row_of_node, accepted, tokens)
        else:  # logprob_token_ids of requests without drafts (vLLM's sampler gave them)
            logprobs = _expand_logprobs(base.logprobs_tensors, width) if base is not None else None
        return SamplerOutput(sampled_token_ids=tokens.int(), logprobs_tensors=logprobs), hidden_rows

    def _medusa_logprobs(self, logits, row_of_node, accepted, tokens) -> LogprobsTensors:
        """vLLM's logprobs of every emitted token, from the raw logits of the row that produced
        it (the root's for the first token, each accepted node's for the next), in the
        [B * (D+1)] layout of speculative decoding (vLLM drops the -1 slots); called when some
        request asked (``max_num_logprobs`` set). ``row_of_node`` [B, Q], ``accepted`` [B, D]
        node ids (-1 pad), ``tokens`` [B, D+1] (-1 pad)."""
        k = self.input_batch.sampling_metadata.max_num_logprobs
        nodes = torch.cat([torch.zeros_like(accepted[:, :1]), accepted], dim=1).long().clamp_min(0)
        rows = row_of_node.gather(1, nodes).clamp_min(0).flatten()  # [B * (D+1)]
        x = logits[rows]
        x = x.float() if self.model_config.logprobs_mode == "raw_logits" else self.sampler.compute_logprobs(x)
        return self.sampler.gather_logprobs(x, k, tokens.flatten().long().clamp_min(0))

    def _medusa_tree_logits(self, logits, num_drafts, drafts, tree_ids):
        """The logits verification must see: each tree row with its request's penalties and
        allowed tokens, as vLLM's sampler would apply them had the row's path been accepted
        (``logits`` [R, V]: per request its root and ``num_drafts`` [B] nodes; ``drafts`` [B, W]);
        ``logits`` itself when no request has any."""
        sm = self.input_batch.sampling_metadata
        if not needs_tree_processing(sm):
            return logits
        self.input_batch.update_async_output_token_ids()  # async: the outputs through the root
        out = tree_logits(logits, sm, num_drafts, drafts, tree_ids, self.medusa_trees)
        if CHECK_PENALTIES:
            self._medusa_penalty_rows += check_tree_logits(out, logits, sm, num_drafts, drafts,
                                                           tree_ids, self.medusa_trees)
        return out

    def _medusa_move_kv(self, slot_mapping, query_start_loc, accepted) -> None:
        """Moves each request's accepted nodes' KV (``accepted`` [B, D] int32: window offsets of
        the request's query, root = 0, -1 pad; ``query_start_loc`` [B+1] int32 its window in
        ``slot_mapping`` [N] int64) into the consecutive slots after its root."""
        k_caches, v_caches = zip(*self._medusa_views())
        kernels.move_accepted_kv(
            list(k_caches), list(v_caches), slot_mapping, query_start_loc, accepted,
            check=not self._medusa_kv_checked,  # first move only: same caches every step
        )
        self._medusa_kv_checked = True

    # ------------------------------------------------------------------ drafting
    def propose_draft_token_ids(self, *args, **kwargs):
        # computed in _sample, right after verification
        if self._medusa_drafts is None:
            raise RuntimeError("medusa_vllm: no drafts were computed in this step's sampling")
        self._medusa_proposed = True
        return self._medusa_drafts

    def _medusa_propose(self, sample_hidden_states, rows):
        """Next drafts from ``sample_hidden_states`` [R, H] at ``rows`` [B] (each request's last
        accepted token; None: row i is request i)."""
        num_reqs = self.input_batch.num_reqs
        k = self._medusa_next_tree(num_reqs)
        if k == NO_TREE:
            return sample_hidden_states.new_zeros((num_reqs, 0), dtype=torch.int64)
        hidden = sample_hidden_states[:num_reqs] if rows is None else sample_hidden_states[rows[:num_reqs]]
        return self._medusa_head_drafts(hidden, k)

    def _medusa_next_tree(self, num_reqs: int) -> int:
        """The tree the next drafts follow (load-adaptive policy; NO_TREE: no drafts), recorded
        per request so the next step reads its scheduled drafts with it."""
        k = self._medusa_peek_next_tree(num_reqs)
        if k == NO_TREE:
            if self._medusa_req_tree:
                for req_id in self.input_batch.req_ids[:num_reqs]:
                    self._medusa_req_tree.pop(req_id, None)
        else:
            self._medusa_req_tree.update(dict.fromkeys(self.input_batch.req_ids[:num_reqs], k))
        return k

    def _medusa_head_drafts(self, hidden, k: int, keep: list | None = None):
        """hidden [B, H] of each request's last accepted token -> drafts [B, T_k] int64 of tree
        k, BFS order; a request whose head logits are not finite gets a row of -1s (no drafts,
        read with the drafts in one copy); no columns for NO_TREE. ``keep``: gets the heads'
        (top-k [B, K, topk], finite [B]) (the heads then run for NO_TREE too), which a uniform
        step's function returns, so another tree's drafts can be gathered from them."""
        if k == NO_TREE and keep is None:
            return torch.zeros((hidden.shape[0], 0), dtype=torch.int64, device=hidden.device)
        topk, finite = self.drafter.head_topk(hidden, self.medusa_cfg.topk)
        if keep is not None:
            keep.extend((topk, finite))
        return self._medusa_tree_drafts(topk, finite, k)

    def _medusa_tree_drafts(self, topk, finite, k: int):
        """The heads' top-k [B, K, topk] and finite [B] -> drafts [B, T_k] of tree k (as
        :meth:`_medusa_head_drafts`; no columns for NO_TREE)."""
        if k == NO_TREE:
            return topk.new_zeros((topk.shape[0], 0))
        size = self.medusa_tree_sizes[k]
        drafts = topk[:, self.medusa_head_idx[k, :size], self.medusa_rank_idx[k, :size]]
        # async scheduling feeds the drafts to the next forward as they are: any valid token
        # keeps verification exact, so a non-finite row becomes token 0 (rejected in practice)
        return torch.where(finite[:, None], drafts, 0 if self.use_async_scheduling else -1)

    def take_draft_token_ids(self):
        # the drafts' hand-over to the scheduler: the one sync of drafting (no SYNC_DEBUG guard)
        with record_function_or_nullcontext("medusa: take_drafts"):
            return self._medusa_take_drafts()

    def _medusa_take_drafts(self):
        out = super().take_draft_token_ids()
        if out is None or self.use_async_scheduling:  # async: verification filters (spec_ok)
            return out
        if not self._medusa_proposed:
            return DraftTokenIds(out.req_ids, [[] for _ in out.req_ids])
        drafts = []
        for req_id, tokens in zip(out.req_ids, out.draft_token_ids):
            if tokens and tokens[0] < 0:  # non-finite head logits (_medusa_propose)
                if req_id not in self._medusa_nan_warned:
                    self._medusa_nan_warned.add(req_id)
                    logger.warning(
                        "medusa_vllm: NaN/Inf in the Medusa heads' logits for request %s; "
                        "speculation is off for it this step", req_id
                    )
                tokens = []
            elif not self._medusa_can_speculate(req_id):
                tokens = []
            drafts.append(tokens)
        return DraftTokenIds(out.req_ids, drafts)

    def _medusa_can_speculate(self, req_id: str) -> bool:
        ok = self._medusa_ok.get(req_id)
        if ok is None:
            state = self.requests.get(req_id)
            ok = can_speculate(state.sampling_params if state is not None else None,
                               self.model_config.logprobs_mode)
            self._medusa_ok[req_id] = ok
        return ok


def _step_key(num_scheduled_tokens, input_batch, scheduler_output) -> str:
    """A step's key (StepPaths, the uniform plan): the draft count every request decodes, past
    its prompt and with scheduled drafts ("0": none), or "mixed" (a prefill chunk, unequal
    counts)."""
    n = len(num_scheduled_tokens)
    if n == 0 or not (num_scheduled_tokens == num_scheduled_tokens[0]).all():
        return "mixed"
    if not (input_batch.num_computed_tokens_cpu[:n] >= input_batch.num_prompt_tokens[:n]).all():
        return "mixed"
    spec = scheduler_output.scheduled_spec_decode_tokens
    drafts = int(num_scheduled_tokens[0]) - 1
    return str(drafts) if drafts == 0 or len(spec) == n else "mixed"


def _sampling_batch(sm, num_reqs: int, device) -> SamplingBatch:
    temp = sm.temperature if sm.temperature is not None else torch.zeros(num_reqs, device=device)
    top_k = sm.top_k.long() if sm.top_k is not None else torch.zeros(num_reqs, dtype=torch.int64, device=device)
    top_p = sm.top_p.float() if sm.top_p is not None else torch.ones(num_reqs, device=device)
    min_p = min_p_of(sm, num_reqs)
    # (filtered: the sampled step's graph set with the filters, min-p among them)
    return SamplingBatch(
        temp[:num_reqs].float(), top_k[:num_reqs], top_p[:num_reqs], sm.generators,
        filtered=sm.top_k is not None or sm.top_p is not None or min_p is not None, min_p=min_p,
    )


def _expand_logprobs(lt: LogprobsTensors | None, width: int) -> LogprobsTensors | None:
    """Logprobs of requests without drafts (one token each) placed at each row's first slot of
    the [B * width] layout vLLM expects when requests may emit several tokens."""
    if lt is None:
        return None

    def spread(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], width, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out[:, 0] = x
        return out.flatten(0, 1)

    return LogprobsTensors(spread(lt.logprob_token_ids), spread(lt.logprobs),
                           spread(lt.selected_token_ranks))


class StepPaths:
    """How many steps of each kind took each path: keyed by the step's draft count per request
    ("0": no drafts, "mixed": prefill chunks or unequal counts), e.g. ``{"63": {"plan cached":
    812, "forward FULL": 812, "verify fixed-shape": 812}}``, plus "forward padding tokens": the
    tokens vLLM's CUDA graphs added to those steps in all. Host counters (a dict increment a
    step), read by summary(): they tell a step that left its fast path (a plan built from the
    batch, a forward outside FULL CUDA graphs, the general verifier) from one that stayed on it."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.key = "mixed"  # this step's key, set by the plan

    def count(self, what: str, n: int = 1) -> None:
        k = (self.key, what)
        self.counts[k] = self.counts.get(k, 0) + n

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (key, what), n in sorted(self.counts.items()):
            out.setdefault(key, {})[what] = n
        return out


class MedusaStats:
    """Accepted length and per-depth acceptance, readable from Python (e.g. through
    ``collective_rpc``). Counted on the device (a histogram of accepted lengths: two kernels a
    step, no host sync); read by summary()."""

    def __init__(self, max_depth: int, device: torch.device | str = "cpu") -> None:
        self.hist = torch.zeros(max_depth + 1, dtype=torch.int64, device=device)  # [D + 1]

    def observe(self, num_accepted: torch.Tensor, has: torch.Tensor) -> None:
        # [B] accepted lengths, [B] 1 for requests verified with a tree this step
        self.hist.index_add_(0, num_accepted.long(), has.long())

    def summary(self) -> dict:
        h = self.hist.tolist()
        steps = sum(h)
        emitted = sum((a + 1) * c for a, c in enumerate(h))
        # depth d accepted when the accepted length exceeds d
        per_depth = [sum(h[d + 1 :]) for d in range(len(h) - 1)]
        return {
            "tree_steps": steps,
            "mean_accepted_length": emitted / steps if steps else 0.0,
            "acceptance_per_depth": [a / max(steps, 1) for a in per_depth],
        }


class MedusaGPUModelRunner(MedusaRunnerMixin, GPUModelRunner):
    pass
