"""Load-adaptive tree size: big trees when the batch is small, smaller ones as it grows, none
when even the smallest would cost more than it returns.

Two rules, chosen with the speculative config's ``adaptive_policy``:

- ``"budget"``: per step the largest tree whose tokens (requests × (1 + nodes)) fit a token
  budget, and no drafts beyond it. A verification step costs about as much as a plain decode
  step while the batch's query tokens stay below the point where the forward pass turns
  compute-bound; the budget (``adaptive_max_tokens`` or a per-device default) stands for that knee.
- ``"measured"`` (default): the engine's scheduler times its steps. For each batch
  size bucket it keeps the recent wall-clock seconds per step of every choice (each tree, and no
  drafts), measured on clean steps (every request decoding that choice), and the mean accepted
  length per tree (the heads' calibrated estimate at first, then the observed one). It picks the
  choice with the most tokens per second, ``τ / seconds per step``, so a large batch on which
  every tree costs more than it returns decodes plainly, and a small one keeps its big tree.
  A tree must beat no drafts by ``SPECULATION_MARGIN`` (10%): clean-step timing leaves out what
  a change of choice and the steps around a prefill cost, and medians of a few steps are
  noisy, so a near tie goes to plain decoding, which costs about what vLLM's plain step does.
  Each choice is measured a few steps first (the choice the batch decodes already, unless a
  measuring run, then the budget rule's, then no drafts, then the trees from the smallest up),
  except one that cannot win: a step never costs less than a step of a smaller tree (or no drafts) in the same bucket,
  or than the same choice's step with fewer requests, so a choice whose τ over the dearest such
  bound is below the best score so far is skipped; a bucket the batch moves into measures little
  beyond the choice it brings. Every change of choice costs a transition step (its drafts were
  made for the other tree), so the choice of the step before is kept while it scores within
  ``STICKY`` of the best. The runner-up is re-measured now and then, so the choice follows the
  load and the content.

The budget rule, as a batch-size schedule of draft counts (:meth:`AdaptiveTreePolicy.schedule`),
is what vLLM's dynamic speculative decoding (``num_speculative_tokens_per_batch_size``) starts
from; the measured rule then rewrites the scheduler's table bucket by bucket (:class:`StepCosts`
decides, :mod:`medusa_vllm.vllm_plugin.scheduler` feeds it and writes).
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Callable, Sequence

from medusa_vllm.tree import TokenTree, expected_accept_length, per_rank_accuracies

# tokens per step below which a forward pass costs about the same (measured: see README)
DEFAULT_TOKEN_BUDGET = {"cuda": 512, "cpu": 32}
NO_TREE = -1  # choose(): no drafts this step
POLICIES = ("measured", "budget")
# vLLM clips the schedule's last range to its max_num_seqs
_OPEN_END = 1 << 20

MIN_SAMPLES = 4  # clean steps measured per (bucket, choice) before it is compared
RUN = 6  # steps a measuring run of one choice lasts (its first two are not timed: a transition)
WINDOW = 16  # recent steps kept per (bucket, choice)
MAX_TRIES = 3  # measuring runs after which a choice that yields no clean steps is left out
IDLE_FACTOR = 4  # a step this many times its choice's usual time: the engine sat idle before it
REMEASURE = 200  # decisions in a bucket between re-measurements of the runner-up
SPECULATION_MARGIN = 1.1  # a tree's tokens/s over no drafts' needed to choose the tree
PRIOR_WEIGHT = 64  # requests' worth of weight of the calibrated τ against the observed one
SKIP_SLACK = 0.95  # a choice is skipped unmeasured if τ / (SKIP_SLACK * its cost bound) < the best
STICKY = 0.97  # the choice of the step before is kept while it scores this much of the best
# batch size buckets: 1, 2, 3, 4, 5-6, 7-8, 9-12, 13-16, 17-24, 25-32, 33-48, ...
_EDGES = [1, 2, 3, 4] + sorted({m << e for e in range(1, 20) for m in (3, 4)})
# τ estimate for heads that carry no calibration: the cumulative top-k accuracies of the bundled
# SmolLM2-135M heads (held-out, per head), a modest small-model profile
GENERIC_ACCURACIES = [
    [0.39, 0.49, 0.55, 0.59, 0.62, 0.64, 0.66, 0.67, 0.68, 0.7],
    [0.2, 0.28, 0.34, 0.38, 0.41, 0.44, 0.46, 0.47, 0.49, 0.5],
    [0.14, 0.21, 0.26, 0.3, 0.33, 0.36, 0.38, 0.4, 0.42, 0.43],
    [0.11, 0.17, 0.21, 0.25, 0.28, 0.31, 0.33, 0.35, 0.37, 0.38],
]


def bucket_of(num_reqs: int) -> int:
    return bisect.bisect_left(_EDGES, max(num_reqs, 1))


def as_ranges(counts: Sequence[int], first: int = 1) -> list[tuple[int, int, int]]:
    """Draft counts of batch sizes first, first + 1, ... -> ``[(first batch size, last batch
    size, drafts), ...]`` with equal neighbours merged (vLLM's schedule format)."""
    out: list[tuple[int, int, int]] = []
    for b, n in enumerate(counts, start=first):
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], b, n)
        else:
            out.append((b, b, n))
    return out


def bucket_range(b: int) -> tuple[int, int]:
    """Batch sizes of bucket ``b`` (inclusive)."""
    return (_EDGES[b - 1] + 1 if b else 1), _EDGES[b]


def bucket_label(b: int) -> str:
    """``"5-6"``, or ``"4"`` for a bucket of one batch size (the stats' keys)."""
    lo, hi = bucket_range(b)
    return f"{lo}-{hi}" if lo != hi else str(lo)


class StepCosts:
    """Recent seconds per step of each choice in each batch-size bucket, and the choice to run
    next (pure bookkeeping: the runner feeds it wall-clock step times)."""

    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = list(choices)  # tree indices, largest first, then NO_TREE
        self._seconds: dict[tuple[int, int], deque[float]] = {}
        self._median: dict[tuple[int, int], float] = {}  # of each window with MIN_SAMPLES
        # bucket -> [choice, steps left, decisions, decision at which to look for unmeasured
        # choices again (none could win at the last look)]
        self._runs: dict[int, list[int]] = {}
        self._tries: dict[tuple[int, int], int] = {}
        self._outliers: dict[tuple[int, int], int] = {}
        self._last: int | None = None  # the choice of the step before (any bucket)
        self._decided: int | None = None  # the last choice made on measurements, not a measuring run

    def observe(self, num_reqs: int, choice: int, seconds: float) -> None:
        key = (bucket_of(num_reqs), choice)
        s = self._seconds.setdefault(key, deque(maxlen=WINDOW))
        if key in self._median and seconds > IDLE_FACTOR * self._median[key]:
            # one such step: the engine sat idle before it (not a step's cost); several in a
            # row: the cost itself changed, so the old samples go
            self._outliers[key] = self._outliers.get(key, 0) + 1
            if self._outliers[key] < 3:
                return
            s.clear()
        self._outliers[key] = 0
        s.append(seconds)
        if len(s) >= MIN_SAMPLES:
            self._median[key] = statistics.median(s)
        else:
            self._median.pop(key, None)

    def seconds(self, num_reqs: int, choice: int) -> float | None:
        """Median seconds per step of ``choice`` at this batch size's bucket (None: unmeasured)."""
        return self._median.get((bucket_of(num_reqs), choice))

    def choose(self, num_reqs: int, start: int, tau: Callable[[int], float]) -> int:
        """The choice for the next step (see :meth:`_choose`), remembered: the next bucket the
        batch moves into starts from it."""
        self._last = self._choose(num_reqs, start, tau)
        return self._last

    def _choose(self, num_reqs: int, start: int, tau: Callable[[int], float]) -> int:
        """A measuring run in progress, else the next unmeasured choice that could win (the
        last choice made on measurements, so that a batch moving into a new bucket keeps decoding
        what it decoded, not what a measuring run tried; then ``start``, no drafts, the trees
        from the smallest up), else the most tokens per second, no drafts' counted
        SPECULATION_MARGIN higher and the choice of the step before kept within STICKY of the
        best (every change of choice costs a transition step). Every REMEASURE decisions the
        runner-up is measured again instead."""
        b = bucket_of(num_reqs)
        run = self._runs.setdefault(b, [start, 0, 0, 0])
        run[2] += 1
        if run[1] > 0:
            run[1] -= 1
            return run[0]
        seconds = {c: self._median.get((b, c)) for c in self.choices}
        scores = {c: tau(c) / s * (SPECULATION_MARGIN if c == NO_TREE else 1.0)
                  for c, s in seconds.items() if s}
        best = max(scores.values(), default=0.0)
        if run[2] >= run[3]:  # at most once a RUN of decisions once nothing could win (host time)
            first = self._decided if self._decided in self.choices else start
            for c in [first, start, *reversed(self.choices)]:  # choices: largest tree first, NO_TREE last
                if (seconds[c] is None and self._tries.get((b, c), 0) < MAX_TRIES
                        and self._bound_score(c, b, tau(c)) >= best):
                    return self._start_run(run, b, c)
            run[3] = run[2] + RUN
        if not scores:
            return start
        ranked = sorted(scores, key=lambda c: -scores[c])
        if run[2] % REMEASURE == 0 and len(ranked) > 1:
            # the best measured rival; an unmeasured choice whose bound comes to beat the best
            # (its costs were stale) is measured by the look above instead
            return self._start_run(run, b, ranked[1])
        keep = self._last in scores and scores[self._last] >= STICKY * scores[ranked[0]]
        self._decided = self._last if keep else ranked[0]
        return self._decided

    def _start_run(self, run: list[int], b: int, c: int) -> int:
        """A measuring run of ``c`` in bucket ``b`` starts with this step."""
        if (b, c) not in self._median:
            self._tries[(b, c)] = self._tries.get((b, c), 0) + 1
        run[0], run[1] = c, RUN - 1
        return c

    def _bound_score(self, c: int, b: int, tau_c: float) -> float:
        """The most tokens per second ``c`` could reach in bucket ``b``: τ over the least it can
        cost (SKIP_SLACK under the dearest step measured that costs no more than it: a cheaper
        choice in this bucket — a smaller tree, or no drafts — or this choice or a cheaper one
        in a bucket of fewer requests). ``inf`` with nothing measured below it."""
        i = self.choices.index(c)
        below = [x for d in self.choices[i:] for bb in range(b + 1)
                 if (d, bb) != (c, b) and (x := self._median.get((bb, d)))]
        if not below:
            return float("inf")
        return tau_c * (SPECULATION_MARGIN if c == NO_TREE else 1.0) / (SKIP_SLACK * max(below))

    def table(self, label: Callable[[int], str] = str) -> dict[str, dict[str, float]]:
        """``{"5-6": {label(choice): ms, ...}, ...}``: measured ms per step (for stats)."""
        out: dict[str, dict[str, float]] = {}
        for (b, c), median in sorted(self._median.items()):
            out.setdefault(bucket_label(b), {})[label(c)] = round(1e3 * median, 3)
        return out


class AdaptiveTreePolicy:
    def __init__(self, trees: Sequence[TokenTree], enabled: bool, budget: int, device: str,
                 policy: str = "budget", head_accuracies: Sequence[Sequence[float]] | None = None
                 ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"medusa_vllm: adaptive_policy {policy!r} is not one of {POLICIES}")
        self.sizes = [len(t) for t in trees]
        self.enabled = enabled and len(trees) > 1
        self.budget = budget or DEFAULT_TOKEN_BUDGET.get(device, 512)
        # candidates from the largest tree to the smallest (one per size: a draft count names it)
        order = sorted(range(len(trees)), key=lambda k: -self.sizes[k])
        self.order = [k for i, k in enumerate(order) if i == 0 or self.sizes[k] != self.sizes[order[i - 1]]]
        self.measured = policy == "measured"
        self.costs = StepCosts([*self.order, NO_TREE])
        # τ per tree: the heads' calibrated estimate, then blended with what verification saw
        acc = per_rank_accuracies(head_accuracies or GENERIC_ACCURACIES)
        self.tau_prior = [expected_accept_length(t, acc) for t in trees]
        self._emitted = [0.0] * len(trees)
        self._verified = [0.0] * len(trees)

    def budget_choice(self, num_reqs: int) -> int:
        """The largest tree whose tokens fit the budget, or NO_TREE."""
        for k in self.order:
            if num_reqs * (1 + self.sizes[k]) <= self.budget:
                return k
        return NO_TREE

    def choose(self, num_reqs: int) -> int:
        """Index of the tree to propose for a step with ``num_reqs`` running requests, or
        NO_TREE. With the measured rule, call it once per step (it runs measuring runs)."""
        if not self.enabled:
            return 0
        start = self.budget_choice(num_reqs)
        return self.costs.choose(num_reqs, start, self.tau) if self.measured else start

    def static_choice(self, num_reqs: int) -> int:
        """The budget rule's choice (the main tree when the policy is off): what the static
        schedule and the verify+heads CUDA graphs hold."""
        return self.budget_choice(num_reqs) if self.enabled else 0

    def num_drafts(self, num_reqs: int) -> int:
        return self.drafts_of(self.static_choice(num_reqs))

    def drafts_of(self, k: int) -> int:
        return 0 if k == NO_TREE else self.sizes[k]

    def tau(self, k: int) -> float:
        if k == NO_TREE:
            return 1.0
        w = PRIOR_WEIGHT
        return (self.tau_prior[k] * w + self._emitted[k]) / (w + self._verified[k])

    def observe_step(self, num_reqs: int, k: int, seconds: float) -> None:
        self.costs.observe(num_reqs, k, seconds)

    def observe_acceptance(self, emitted: Sequence[float], verified: Sequence[float]) -> None:
        """Tokens emitted and requests verified per tree since the last call."""
        for k in range(len(self._emitted)):
            self._emitted[k] += float(emitted[k])
            self._verified[k] += float(verified[k])

    def tree_of_num_drafts(self, n: int) -> int:
        """The tree a draft count stands for (NO_TREE for 0)."""
        if n == 0:
            return NO_TREE
        for k in self.order:
            if self.sizes[k] == n:
                return k
        raise ValueError(f"medusa_vllm: no tree of the adaptive policy has {n} nodes ({self.sizes})")

    def schedule(self, max_batch: int) -> list[tuple[int, int, int]]:
        """``[(first batch size, last batch size, drafts), ...]`` for batch sizes 1..max_batch
        (the last range left open), vLLM's ``num_speculative_tokens_per_batch_size`` format:
        the budget rule."""
        out = as_ranges([self.num_drafts(b) for b in range(1, max_batch + 1)])
        out[-1] = (out[-1][0], _OPEN_END, out[-1][2])
        return out

    def summary(self) -> dict:
        return {
            "policy": "measured" if self.measured else "budget",
            "tau": {str(self.sizes[k]): round(self.tau(k), 3) for k in self.order},
            # per batch-size bucket, ms per step by draft count (0: no drafts)
            "ms_per_step": self.costs.table(lambda k: str(self.drafts_of(k))),
        }
