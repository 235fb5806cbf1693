"""medusa_vllm.profiling on the CPU: per-step figures come from vLLM's step regions, and a
profile without them (vLLM's V2 runner) reports totals only instead of dividing by one."""
import gzip
import json

import torch

from medusa_vllm.profiling import start_profile, stop_profile


class Worker:
    pass


def _profile(steps: int) -> dict:
    w = Worker()
    start_profile(w)
    for _ in range(steps):
        with torch.profiler.record_function("gpu_model_runner: forward"):
            torch.randn(32, 32) @ torch.randn(32, 32)
        with torch.profiler.record_function("medusa: plan"):
            torch.zeros(4).add_(1)
    torch.randn(8, 8) @ torch.randn(8, 8)  # work outside any region
    return stop_profile(w)


def test_per_step_figures_divide_by_forwards():
    s = _profile(3)
    assert s["steps"] == 3
    assert s["regions"]["medusa: plan"]["calls_per_step"] == 1.0
    assert s["regions"]["gpu_model_runner: forward"]["calls_per_step"] == 1.0
    assert abs(s["wall_ms_per_step"] * 3 - s["wall_ms"]) < 1e-6


def test_no_step_regions_gives_totals_only():
    w = Worker()
    start_profile(w)
    torch.randn(8, 8) @ torch.randn(8, 8)
    s = stop_profile(w)
    assert s["steps"] == 0 and s["wall_ms_per_step"] is None and s["device_ms_per_step"] is None
    assert s["wall_ms"] > 0


def test_chrome_trace_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_VLLM_PROFILE_TRACE", str(tmp_path))
    _profile(2)
    (trace,) = tmp_path.glob("trace_*.json.gz")
    names = {e.get("name") for e in json.load(gzip.open(trace))["traceEvents"]}
    assert {"gpu_model_runner: forward", "medusa: plan"} <= names
