"""GPU worker that builds medusa_vllm's model runner instead of vLLM's (selected via ``worker_cls``).

vLLM's workers construct their runner by module-level name inside ``init_device``; we swap that
name for the duration of the call, so the rest of the worker stays vLLM's own. The CPU worker
lives in :mod:`.worker_cpu`: importing vLLM's CPU worker patches ``torch.Event`` process-wide
(``vllm/v1/worker/cpu/shm.py``), which breaks torch.compile's autotuning on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vllm.v1.worker import gpu_model_runner
from vllm.v1.worker.gpu_worker import Worker


@contextlib.contextmanager
def _swapped(module: object, name: str, replacement: type) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class MedusaStatsMixin:
    def medusa_stats(self) -> dict:
        """Tree steps, mean accepted length and per-depth acceptance of this worker so far, and
        how many uniform greedy (and sampled) steps replayed a verify+heads CUDA graph:
        ``llm.collective_rpc("medusa_stats")`` (one dict per worker)."""
        from medusa_vllm import kernels

        runner = self.model_runner
        attention = (runner.medusa_attn.backend if runner.medusa_attn.backend != "kernel" else
                     "kernel" if kernels.have_extension() else "reference ops (no compiled extension)")
        out = runner.medusa_stats.summary() | {
            "runner": getattr(runner, "medusa_runner", "v1"),  # vLLM's V1 or V2 model runner
            "attention": attention, "uniform_greedy": _graphs_summary(runner._medusa_graphs),
            "uniform_sampled": _graphs_summary(runner._medusa_sampled_graphs),
            "async_scheduling": bool(runner.scheduler_config.async_scheduling),
            # the sampled step's target filter and rejection walk (top_k_top_p, rejection_walk)
            "sampling_ops": getattr(runner, "medusa_sampling_ops", None),
            # per draft count of a step: how its plan, forward (CUDA graph mode) and
            # verification ran (runner.StepPaths)
            "step_paths": runner.medusa_paths.summary(),
            # adaptive + async: the batch-size -> draft count schedule vLLM's scheduler follows
            "draft_schedule": getattr(runner.speculative_config,
                                      "num_speculative_tokens_per_batch_size", None)}
        if hasattr(runner, "_medusa_penalty_rows"):  # the V1 runner
            # MEDUSA_VLLM_CHECK_PENALTIES: tree rows checked against vLLM's penalties so far
            out["penalty_rows_checked"] = runner._medusa_penalty_rows
        return out


class MedusaGPUWorker(MedusaStatsMixin, Worker):
    def init_device(self) -> None:
        if self.vllm_config.use_v2_model_runner:  # "runner": "v2" (the plugin decides)
            from vllm.v1.worker.gpu import model_runner as v2_model_runner

            from medusa_vllm.vllm_plugin.runner_v2 import MedusaV2ModelRunner

            with _swapped(v2_model_runner, "GPUModelRunner", MedusaV2ModelRunner):
                super().init_device()
            return
        from medusa_vllm.vllm_plugin.runner import MedusaGPUModelRunner

        with _swapped(gpu_model_runner, "GPUModelRunner", MedusaGPUModelRunner):
            super().init_device()


def _graphs_summary(graphs: dict) -> dict:
    """Uniform steps and verify+heads graph replays, over every tree's graphs; the batch sizes
    with graphs per tree size."""
    parts = {g.name: g.summary() for g in graphs.values()}
    main = next(iter(parts.values()))
    return {"graph_batch_sizes": main["graph_batch_sizes"],
            "steps": sum(p["steps"] for p in parts.values()),
            "graph_replays": sum(p["graph_replays"] for p in parts.values()),
            "by_tree": parts}
