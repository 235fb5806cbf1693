"""Where an engine step's time goes: the torch profiler inside vLLM's worker process.

    llm = LLM(...)  # with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (callables over collective_rpc)
                    # and VLLM_CUSTOM_SCOPES_FOR_PROFILING=1 (vLLM's own step regions)
    llm.collective_rpc(start_profile)
    llm.generate(...)
    summary = llm.collective_rpc(stop_profile)[0]

Works with any vLLM worker (plain or speculative). ``summary``: host (CPU) time per step of
vLLM's runner regions ("gpu_model_runner: …") and medusa_vllm's ("medusa: …"), device time per
step of the top kernels, CUDA runtime calls per step (graph launches, kernel launches, copies,
synchronisations) and the profiler's own table as text. Per step = divided by the number of
model forwards ("gpu_model_runner: forward"). Profiling inflates host times (each op is recorded);
compare regions with each other, and take wall-clock step costs from an unprofiled run.
With ``MEDUSA_VLLM_PROFILE_TRACE=DIR`` each profile is also written as a Chrome trace
(``DIR/trace_<pid>_<n>.json.gz``, open in Perfetto) to see the host/device timeline.
"""

from __future__ import annotations

import os
import time

import torch

_RUNTIME_CALLS = ("cudaGraphLaunch", "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                  "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaEventSynchronize",
                  "cudaDeviceSynchronize", "cudaStreamWaitEvent", "cudaMalloc", "cudaFree",
                  "aten::_local_scalar_dense")
_STEP_REGION = "gpu_model_runner: forward"


def start_profile(worker) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.start()
    worker._medusa_profile = (prof, time.perf_counter())


def stop_profile(worker, top: int = 25) -> dict:
    prof, t0 = worker._medusa_profile
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.stop()
    wall = time.perf_counter() - t0
    del worker._medusa_profile
    summary = summarize(prof.key_averages(), wall, top)
    trace_dir = os.environ.get("MEDUSA_VLLM_PROFILE_TRACE")
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        n = getattr(worker, "_medusa_traces", 0)
        worker._medusa_traces = n + 1
        prof.export_chrome_trace(os.path.join(trace_dir, f"trace_{os.getpid()}_{n}.json.gz"))
    return summary


def summarize(events, wall_s: float, top: int = 25) -> dict:
    """``events``: ``profile.key_averages()``."""
    by_key = {}
    for e in events:  # a region appears twice (host range, device annotation): keep the host one
        if e.key not in by_key or e.cpu_time_total > by_key[e.key].cpu_time_total:
            by_key[e.key] = e
    steps = by_key[_STEP_REGION].count if _STEP_REGION in by_key else 0

    def per_step(x):  # vLLM's V2 runner (plain decoding) has no step regions: no per-step figures
        return x / steps if steps else None

    regions = {
        k: {"calls_per_step": per_step(e.count), "host_ms_per_step": per_step(e.cpu_time_total / 1000)}
        for k, e in sorted(by_key.items()) if k.startswith(("gpu_model_runner:", "medusa:"))
    }
    kernels = sorted((e for e in events if getattr(e, "self_device_time_total", 0) > 0
                      and not e.key.startswith(("gpu_model_runner:", "medusa:"))),
                     key=lambda e: -e.self_device_time_total)
    device_total = sum(e.self_device_time_total for e in kernels)
    return {
        "steps": steps,
        "wall_ms": 1000 * wall_s,
        "device_ms": device_total / 1000,
        "wall_ms_per_step": per_step(1000 * wall_s),
        "regions": regions,
        "runtime_calls_per_step": {k: per_step(by_key[k].count) for k in _RUNTIME_CALLS if k in by_key},
        "device_ms_per_step": per_step(device_total / 1000),
        "top_kernels": [
            {"name": e.key[:120], "calls": e.count, "calls_per_step": per_step(e.count),
             "device_ms_per_step": per_step(e.self_device_time_total / 1000)}
            for e in kernels[:top]
        ],
        "table": events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60),
    }
