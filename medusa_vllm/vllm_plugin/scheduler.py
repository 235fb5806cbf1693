"""vLLM's scheduler with the measured load-adaptive tree (:mod:`medusa_vllm.adaptive` decides).

With ``adaptive`` on, the plugin runs vLLM's dynamic speculative decoding: the scheduler looks
up each step's draft count in a batch size -> count table, built from the budget rule's
schedule (``num_speculative_tokens_per_batch_size``), and the runner drafts the tree of that
count. The scheduler sees everything the measured rule needs — when each step starts, how many
requests it runs, how many drafts each has, how many tokens each emitted — and it is the one
place that decides for every rank and every executor (in-process, multiprocessing, Ray). So
these subclasses time clean steps (every request decoding the same draft count, no prefill),
count emitted tokens per tree, and rewrite the table's entries for the current batch-size
bucket as the policy chooses. A changed entry takes effect at the next step vLLM schedules
(under asynchronous scheduling, its draft slots one step later).

With ``admit_group`` > 1 (the plugin's default on a GPU) it also holds new requests until that
many could be admitted — waiting, and no more than the free slots — or the oldest has waited
``admit_wait`` steps, through vLLM's own prefill deferral: :mod:`medusa_vllm.admission`.
"""

from __future__ import annotations

import time

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from medusa_vllm.adaptive import (
    IDLE_FACTOR,
    MIN_SAMPLES,
    NO_TREE,
    AdaptiveTreePolicy,
    as_ranges,
    bucket_label,
    bucket_of,
    bucket_range,
)
from medusa_vllm.admission import AdmissionGroups, effective_group
from medusa_vllm.vllm_plugin.config import MedusaSpecConfig
from medusa_vllm.vllm_plugin.step import can_speculate

logger = init_logger(__name__)
LOG_EVERY = 5000  # steps between log lines of the measured table


class MeasuredSchedule:
    """The measured rule's bookkeeping on the scheduler's side (no vLLM state of its own)."""

    def __init__(self, policy: AdaptiveTreePolicy, lookup: list[int]) -> None:
        self.policy = policy
        self.lookup = lookup  # the scheduler's dense table: lookup[batch size] = draft count
        # the step in flight: (start, num_reqs, choice; None if not clean)
        self._cur: tuple[float, int, int | None] | None = None
        # (bucket, choice) of the two steps before the current one (None: not clean)
        self._before: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
        self._steps = 0
        self.spent: dict[tuple[int, str], list] = {}  # (bucket, label) -> [steps, timed, seconds]

    def step(self, now: float, num_reqs: int, choice: int | None) -> None:
        """A step was scheduled at ``now`` (``choice``: its draft count's tree, NO_TREE, or None
        if it was not clean). The step before it ends now; its seconds count when the two steps
        before it ran the same clean choice. The first step of a change is a transition (its
        drafts were made for the earlier choice), and under asynchronous scheduling the time
        between two schedules is mostly the previous step's execution (the scheduler waits for
        its output), so the second step's interval still holds the transition's cost."""
        key = None
        if self._cur is not None:
            start, n, c = self._cur
            self._account(n, c, now - start)
            if c is not None:
                key = (bucket_of(n), c)
                if self._before == (key, key):
                    self.policy.observe_step(n, c, now - start)
        self._before = (self._before[1], key)
        self._cur = (now, num_reqs, choice) if num_reqs else None
        if num_reqs:
            self._decide(num_reqs)

    def idle(self) -> None:
        """No request is left (the engine waits for new ones): the step in flight is counted
        but not timed, and the next step starts afresh. Its interval would run until the next
        request arrives, and under asynchronous scheduling it may be a step scheduled for
        requests that finished meanwhile."""
        if self._cur is not None:
            _, n, c = self._cur
            self._account(n, c, None)
        self._cur = None
        self._before = (None, None)

    def _account(self, num_reqs: int, choice: int | None, dt: float | None) -> None:
        """Every step's interval, clean or not, by bucket and draft count ("mixed": a prefill,
        a new request or mixed draft counts): where the time went, transitions included. An
        interval over IDLE_FACTOR times its key's mean so far is the engine waiting for
        requests: counted as a step, not timed (as is ``dt`` None)."""
        label = "mixed" if choice is None else str(self.policy.drafts_of(choice))
        e = self.spent.setdefault((bucket_of(num_reqs), label), [0, 0, 0.0])
        e[0] += 1
        if dt is None:
            return
        if e[1] < MIN_SAMPLES or dt <= IDLE_FACTOR * e[2] / e[1]:
            e[1] += 1
            e[2] += dt

    def spent_summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{"49-64": {"0": {"steps": 310, "ms": 4.5}, "7": {...}, "mixed": {...}}, ...}``:
        steps run and mean ms per step of each choice per bucket (for stats)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (b, label), (steps, timed, seconds) in sorted(self.spent.items()):
            out.setdefault(bucket_label(b), {})[label] = {
                "steps": steps, "ms": round(1e3 * seconds / timed, 3) if timed else None}
        return out

    def _decide(self, num_reqs: int) -> None:
        k = self.policy.choose(num_reqs)
        n = self.policy.drafts_of(k)
        lo, hi = bucket_range(bucket_of(num_reqs))
        for b in range(lo, min(hi, len(self.lookup) - 1) + 1):
            self.lookup[b] = n
        self._steps += 1
        if self._steps % LOG_EVERY == 0:
            logger.info("medusa_vllm adaptive: %s", self.policy.summary())


def step_choice(policy: AdaptiveTreePolicy, scheduler_output) -> int | None:
    """The tree (or NO_TREE) every request of a scheduled step decodes, or None if the step is
    not clean: a new or prefilling request, or requests with different draft counts."""
    counts = scheduler_output.num_scheduled_tokens
    if not counts or scheduler_output.scheduled_new_reqs:
        return None
    spec = scheduler_output.scheduled_spec_decode_tokens
    n = len(next(iter(spec.values()))) if spec else 0
    if (n and len(spec) != len(counts)) or any(c != 1 + n for c in counts.values()):
        return None
    if any(len(v) != n for v in spec.values()) or (n and n not in policy.sizes):
        return None
    return policy.tree_of_num_drafts(n)


class MedusaSchedulerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        cfg = MedusaSpecConfig.from_dict(vllm_config.additional_config["medusa_vllm"])
        self.medusa_measured: MeasuredSchedule | None = None
        # new requests admitted in groups (speculative config admit_group > 1; else vLLM's way)
        group = effective_group(cfg.admit_group, self.max_num_running_reqs)
        self.medusa_admission = AdmissionGroups(group, cfg.admit_wait) if group > 1 else None
        self.medusa_held_steps = 0  # steps that deferred new requests' prefills (stats, tests)
        self.medusa_hold_overridden = 0  # steps asked to defer that admitted anyway (no request decoding)
        self._medusa_ok: dict[str, bool] = {}  # can_speculate per running request (cached)
        self._medusa_logprobs_mode = vllm_config.model_config.logprobs_mode
        if cfg.adaptive and cfg.adaptive_policy == "measured" and self.dynamic_sd_lookup is not None:
            device = "cpu" if vllm_config.device_config.device.type == "cpu" else "cuda"
            policy = AdaptiveTreePolicy(cfg.trees, True, cfg.adaptive_max_tokens, device,
                                        policy="measured", head_accuracies=cfg.head_accuracies)
            self.medusa_measured = MeasuredSchedule(policy, self.dynamic_sd_lookup)
        _add_engine_core_utility()

    def schedule(self, throttle_prefills: bool = False):
        now = time.perf_counter()
        hold = False
        if self.medusa_admission is not None:
            waiting = len(self.waiting) + len(self.skipped_waiting)
            free = self.max_num_running_reqs - len(self.running)
            hold = self.medusa_admission.hold(self.current_step + 1, min(waiting, free))  # (vLLM counts it up next)
        if hold:
            # vLLM's own deferral (data-parallel prefill balancing) then holds the new prefills
            # while running requests decode. It ignores the request while its last admitting step
            # left requests waiting for lack of slots ("saturated"); a full batch with a deep
            # queue is the case the group of free slots is for (medusa_vllm.admission), so that
            # flag is cleared here; vLLM sets it again at the next step that admits.
            self.prefill_capacity_bound = False
        out = super().schedule(throttle_prefills or hold)
        if hold:
            if out.scheduled_new_reqs:
                self.medusa_hold_overridden += 1
            else:
                self.medusa_held_steps += 1
        m = self.medusa_measured
        if m is not None:
            m.step(now, len(out.num_scheduled_tokens), step_choice(m.policy, out))
            for req_id in out.finished_req_ids:
                self._medusa_ok.pop(req_id, None)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        m = self.medusa_measured
        if m is not None and scheduler_output.scheduled_spec_decode_tokens:
            _count_emitted(m.policy, self.requests, scheduler_output, model_runner_output,
                           self._medusa_ok, self._medusa_logprobs_mode)
        out = super().update_from_output(scheduler_output, model_runner_output)
        if m is not None and not self.has_unfinished_requests():
            m.idle()  # the gap until the next request is not a step's cost
        return out

    def medusa_adaptive_summary(self) -> dict | None:
        m = self.medusa_measured
        out = None if m is None else m.policy.summary() | {
            "lookup": as_ranges(m.lookup[1:]), "steps": m.spent_summary()}
        a = self.medusa_admission
        if a is not None:  # admission groups: how many steps deferred new prefills
            out = (out or {}) | {"admission": {"group": a.group, "max_wait": a.max_wait,
                                               "held_steps": self.medusa_held_steps,
                                               "overridden": self.medusa_hold_overridden,
                                               "steps": self.current_step}}
        return out


def _add_engine_core_utility() -> None:
    """``EngineCore.medusa_adaptive``: what ``medusa_vllm.vllm_plugin.adaptive_summary(llm)``
    calls (vLLM's utility calls reach any engine-core method by name)."""
    from vllm.v1.engine.core import EngineCore  # loaded: the engine core is building us

    if not hasattr(EngineCore, "medusa_adaptive"):
        EngineCore.medusa_adaptive = lambda self: getattr(
            self.scheduler, "medusa_adaptive_summary", lambda: None)()


def _count_emitted(policy: AdaptiveTreePolicy, requests, scheduler_output, runner_output,
                   ok: dict[str, bool], logprobs_mode: str = "raw_logprobs") -> None:
    """Tokens emitted per tree by the requests that verified drafts this step (requests whose
    sampling options speculation cannot serve emit vLLM's one token: left out; ``ok`` caches
    that per request id)."""
    sampled = runner_output.sampled_token_ids
    index = runner_output.req_id_to_index
    emitted = [0.0] * len(policy.sizes)
    verified = [0.0] * len(policy.sizes)
    for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
        i = index.get(req_id)
        req = requests.get(req_id)
        n = len(drafts)
        if i is None or i >= len(sampled) or req is None or n not in policy.sizes:
            continue
        if req_id not in ok:
            ok[req_id] = can_speculate(req.sampling_params, logprobs_mode)
        if not ok[req_id]:
            continue
        k = policy.tree_of_num_drafts(n)
        if k != NO_TREE:
            emitted[k] += len(sampled[i])
            verified[k] += 1
    policy.observe_acceptance(emitted, verified)


class MedusaScheduler(MedusaSchedulerMixin, Scheduler):
    pass


class MedusaAsyncScheduler(MedusaSchedulerMixin, AsyncScheduler):
    pass
