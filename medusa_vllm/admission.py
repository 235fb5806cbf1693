"""Admitting waiting requests in groups (no vLLM here; the scheduler asks, :mod:`.vllm_plugin.scheduler`).

A step that carries a new request's prefill costs several decode steps in vLLM 0.26 on a GPU: it
runs piecewise CUDA graphs with the attention between them in eager mode (about 15 ms against
3–5 ms for a graphed tree step on an H100, ``benchmarks/results/step_log_h100_steady_sampled_eb2ae49.json``).
A speculative batch's requests finish at different steps, so under a steady load it admits one
or two requests at a time and pays that step again and again: 60% of the time at 25–64
requests in ``throughput_h100_steady_b228326.json``. Holding new requests until ``group`` of
them wait (or the oldest has waited ``max_wait`` steps) puts their prefills into one step, at
the price of up to ``max_wait`` steps of extra time to first token (TGI's
``--waiting-served-ratio`` / ``--max-waiting-tokens`` trade the same way).

``group`` 1 (the default) admits at once, as vLLM does. The scheduler passes the decision to
vLLM's own prefill deferral (``Scheduler.schedule(throttle_prefills=True)``, made for data-parallel
prefill balancing), which defers only while some running request decodes and never when the last
admitting step left requests waiting for lack of capacity: an idle or saturated engine never
waits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdmissionGroups:
    group: int = 1  # waiting requests that are admitted together (1: at once)
    max_wait: int = 8  # steps the oldest waiting request is held at most

    def __post_init__(self) -> None:
        if self.group < 1 or self.max_wait < 1:
            raise ValueError(f"admission groups: group {self.group} and max_wait {self.max_wait} must be >= 1")
        self._since: int | None = None  # the step at which the current wait began

    def hold(self, step: int, waiting: int) -> bool:
        """Should step ``step`` (counting up) defer new prefills, with ``waiting`` requests
        waiting? False releases them (the wait starts afresh with the next request)."""
        if self.group <= 1 or waiting <= 0:
            self._since = None
            return False
        if self._since is None:
            self._since = step
        if waiting >= self.group or step - self._since >= self.max_wait:
            self._since = None
            return False
        return True
