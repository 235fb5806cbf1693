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

The group counts the requests that could be admitted now: the waiting ones, at most as many
as the batch has free slots (``max_num_seqs`` less the running requests). So a server with a
deep queue, whose batch is full and frees a slot or two a step, gathers a group of free slots
before it admits, as a short queue gathers a group of requests. ``group`` 1 admits at once, as
vLLM does, and is the default on a CPU; on a GPU the plugin's default is :data:`GPU_GROUP`.
Either is capped at half the batch (:func:`effective_group`).

The scheduler passes the decision to vLLM's own prefill deferral
(``Scheduler.schedule(throttle_prefills=True)``, made for data-parallel prefill balancing),
which defers only while some running request decodes: an idle engine never waits.

Measured (H100, steady load of 4 × b requests with output lengths spread ±50%, FLASH_ATTN,
``benchmarks/results/throughput_h100_steady_flash_d5ed84c.json``): the 63-node tree went from
1.08× / 0.91× of vLLM without speculation at batch 32 / 64 to 1.28× / 1.13× with groups of 4,
its median time per output token (admission to end) from 2.84 / 4.53 ms to 2.20 / 3.38 ms."""

from __future__ import annotations

from dataclasses import dataclass

GPU_GROUP = 4  # the plugin's admit_group on a GPU when none is given


def effective_group(group: int, max_num_seqs: int) -> int:
    """The group a batch of at most ``max_num_seqs`` requests waits for: at most half the batch
    (a group of free slots as large as the batch would turn a steady load into closed rounds);
    1 means admit at once."""
    return max(1, min(group, max_num_seqs // 2))


@dataclass
class AdmissionGroups:
    group: int = 1  # requests admitted together (1: at once)
    max_wait: int = 8  # steps the oldest waiting request is held at most

    def __post_init__(self) -> None:
        if self.group < 1 or self.max_wait < 1:
            raise ValueError(f"admission groups: group {self.group} and max_wait {self.max_wait} must be >= 1")
        self._since: int | None = None  # the step at which the current wait began

    def hold(self, step: int, admittable: int) -> bool:
        """Should step ``step`` (counting up) defer new prefills, with ``admittable`` requests
        that could be admitted now (waiting, and no more than the free slots)? False releases
        them (the wait starts afresh with the next admittable request)."""
        if self.group <= 1 or admittable <= 0:
            self._since = None
            return False
        if self._since is None:
            self._since = step
        if admittable >= self.group or step - self._since >= self.max_wait:
            self._since = None
            return False
        return True
