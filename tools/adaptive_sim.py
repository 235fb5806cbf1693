"""The measured load-adaptive policy on a GPU run's own step costs, in simulation (CPU, seconds).

A throughput JSON from an ``adaptive`` configuration keeps what the policy measured: the median
ms per clean step of each choice (tree, or no drafts) per batch-size bucket, and τ per tree.
This replays the policy (``medusa_vllm.adaptive.AdaptiveTreePolicy``, the same code the
scheduler runs) for a steady batch, with those costs plus Gaussian noise, and prints per
batch size the tokens per second of the policy, of every fixed choice and of the best one (the
oracle), each over no drafts. A choice the run did not measure in a bucket takes the nearest
bucket's cost. It tells the policy's own loss (measuring runs, noisy medians) from what the
end-to-end run lost elsewhere (transitions, prefills, batches that shrink through buckets).

    python tools/adaptive_sim.py benchmarks/results/throughput_h100_adaptive_v2_4359400.json

``--rounds N`` replays the benchmark's rounds instead: every batch size in turn, N times, each
round starting full and draining as its requests reach ``--max-tokens`` (accepted lengths drawn
around each tree's τ), so the batch crosses buckets as in a real run; ``--transition F`` charges
F of a step's cost to every step whose choice differs from the step before (its drafts were
made for the other tree). The first round of each batch size is a warm-up, as in the benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_vllm.adaptive import NO_TREE, AdaptiveTreePolicy, bucket_label, bucket_of  # noqa: E402
from medusa_vllm.tree import get_tree  # noqa: E402

PRESETS = {63: "default-63", 31: "sparse-31", 15: "sparse-15", 7: "sparse-7", 3: "chain-3"}


def cost_table(adaptive: dict):
    """(batch size, drafts) -> seconds per step, from the run's ``ms_per_step`` (nearest bucket
    when the run did not measure that choice in that bucket; None if it never did)."""
    ms = adaptive["ms_per_step"]

    def cost(num_reqs: int, drafts: int) -> float | None:
        b = bucket_of(num_reqs)
        for dist in range(0, 40):
            for bb in sorted({b - dist, b + dist}):
                row = ms.get(bucket_label(bb), {}) if bb >= 0 else {}
                if str(drafts) in row:
                    return row[str(drafts)] / 1e3
        return None

    return cost


def measured_policy(sizes: list[int], tau: dict[int, float]) -> AdaptiveTreePolicy:
    """The measured rule over the preset trees of these sizes, starting from the τ the run
    observed."""
    policy = AdaptiveTreePolicy([get_tree(PRESETS[n]) for n in sizes], True, 0, "cuda", policy="measured")
    policy.tau_prior = [tau[n] for n in sizes]
    return policy


def simulate(sizes: list[int], tau: dict[int, float], cost, num_reqs: int, steps: int, noise: float,
             seed: int) -> tuple[float, Counter]:
    """Tokens per second of the measured policy at a steady ``num_reqs``, and its choices."""
    rng = random.Random(seed)
    policy = measured_policy(sizes, tau)
    tokens = seconds = 0.0
    chosen: Counter = Counter()
    for _ in range(steps):
        k = policy.choose(num_reqs)
        drafts = policy.drafts_of(k)
        dt = cost(num_reqs, drafts) * max(0.1, 1 + rng.gauss(0, noise))
        policy.observe_step(num_reqs, k, dt)
        tokens += num_reqs * (1.0 if k == NO_TREE else tau[drafts])
        seconds += dt
        chosen[drafts] += 1
    return tokens / seconds, chosen


@lru_cache(maxsize=None)
def continuation(tau: float, depth: int) -> float:
    """The q for which 1 + a run of accepted drafts (each next one with probability q, at
    most ``depth``) averages ``tau`` tokens (bisection, once per tree)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if sum(q ** d for d in range(depth + 1)) < tau else (lo, q)
    return q


def accepted_length(rng: random.Random, tau: float, depth: int) -> int:
    """Tokens a request emits in one step, averaging ``tau`` (:func:`continuation`)."""
    q = continuation(tau, depth)
    n = 1
    while n <= depth and rng.random() < q:
        n += 1
    return n


def simulate_rounds(sizes: list[int], tau: dict[int, float], cost, batch_sizes: list[int], rounds: int,
                    max_tokens: int, noise: float, transition: float, seed: int, fixed: int | None = None
                    ) -> tuple[dict[int, float], int]:
    """Tokens per second per batch size (rounds after the first) of the measured policy, or of
    the fixed choice ``fixed`` (a draft count, 0: none), and the number of changes of choice."""
    rng = random.Random(seed)
    policy = measured_policy(sizes, tau)
    depth = {n: get_tree(PRESETS[n]).depth for n in sizes}
    acc: dict[int, list[float]] = {}
    prev, changes = fixed, 0
    for r in range(rounds):
        for b in batch_sizes:
            left, tokens, seconds = [max_tokens] * b, 0, 0.0
            while left:
                k = policy.choose(len(left)) if fixed is None else None
                drafts = policy.drafts_of(k) if fixed is None else fixed
                dt = cost(len(left), drafts) * max(0.1, 1 + rng.gauss(0, noise))
                if fixed is None:
                    policy.observe_step(len(left), k, dt)
                if drafts != prev:
                    dt += transition * cost(len(left), drafts)
                    changes += prev is not None
                prev = drafts
                emitted = [min(n, 1 if drafts == 0 else accepted_length(rng, tau[drafts], depth[drafts]))
                           for n in left]
                tokens += sum(emitted)
                seconds += dt
                left = [n - e for n, e in zip(left, emitted) if n > e]
            if r:
                a = acc.setdefault(b, [0.0, 0.0])
                a[0] += tokens
                a[1] += seconds
    return {b: t / s for b, (t, s) in acc.items()}, changes


def main_rounds(args, name: str, sizes: list[int], tau: dict[int, float], cost) -> None:
    print(f"{name}: trees {sizes}, τ {tau}; {args.rounds} rounds of {args.max_tokens} tokens per batch "
          f"size, noise {args.noise}, transition {args.transition} of a step, {args.seeds} seeds")
    print(f"{'batch':>5} {'policy':>7} {'best':>7} {'of':>5}  fixed choices (tokens/s over no drafts)")

    def mean(choice: int | None) -> tuple[dict[int, float], float]:
        runs = [simulate_rounds(sizes, tau, cost, args.batch_sizes, args.rounds, args.max_tokens, args.noise,
                                args.transition, s, choice) for s in range(args.seeds)]
        return ({b: sum(r[0][b] for r in runs) / len(runs) for b in args.batch_sizes},
                sum(r[1] for r in runs) / len(runs))

    plain, _ = mean(0)
    fixed = {n: mean(n)[0] for n in sizes}
    policy, changes = mean(None)
    for b in args.batch_sizes:
        ratios = {n: fixed[n][b] / plain[b] for n in sizes}
        best = max(ratios, key=ratios.get)
        print(f"{b:>5} {policy[b] / plain[b]:7.3f} {ratios[best]:7.3f} {best:>5}  "
              + " ".join(f"{n}:{x:.2f}" for n, x in ratios.items()))
    print(f"changes of choice per run: {changes:.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a throughput JSON with an adaptive configuration")
    ap.add_argument("--config", default=None, help="its name (default: the first adaptive one)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=400, help="steps per batch size (a round of 128 "
                    "tokens is about 70 at τ 1.8)")
    ap.add_argument("--noise", type=float, default=0.05, help="relative spread of a step's time")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=0, help="replay the benchmark's draining rounds "
                    "(this many per batch size, the first a warm-up) instead of a steady batch")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request in --rounds")
    ap.add_argument("--transition", type=float, default=0.0, help="extra cost of a change of choice, "
                    "in steps of the new choice (--rounds)")
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.rounds == 1 or args.transition < 0 or args.max_tokens < 1:
        sys.exit(f"--rounds {args.rounds} / --transition {args.transition} / --max-tokens {args.max_tokens}: "
                 "give --rounds 0 (a steady batch) or 2 and more (the first is a warm-up), "
                 "--transition 0 or more, --max-tokens 1 or more")
    stats = json.loads(Path(args.result).read_text())["summary"].get("medusa_stats") or {}
    name = args.config or next((c for c in stats if c.startswith("adaptive")), None)
    adaptive = (stats.get(name) or {}).get("adaptive") if name else None
    if not adaptive or not adaptive.get("ms_per_step"):
        sys.exit(f"{args.result}: no measured adaptive configuration{f' named {name}' if name else ''} in "
                 f"summary.medusa_stats ({', '.join(stats) or 'none'}); give a throughput JSON of an "
                 f"adaptive run (adaptive_policy measured), or --config")
    tau = {int(n): t for n, t in adaptive["tau"].items()}
    cost = cost_table(adaptive)
    sizes = sorted((n for n in tau if cost(1, n) is not None), reverse=True)  # trees the run timed
    tau = {n: tau[n] for n in sizes}
    if cost(1, 0) is None:
        sys.exit(f"{args.result}: the run never timed a step without drafts; nothing to compare with")
    if args.rounds:
        return main_rounds(args, name, sizes, tau, cost)
    print(f"{name}: trees {sizes}, τ {tau}; {args.steps} steps, noise {args.noise}, {args.seeds} seeds")
    print(f"{'batch':>5} {'policy':>7} {'oracle':>7} {'best':>5}  fixed choices (tokens/s over no drafts)")
    for b in args.batch_sizes:
        plain = 1.0 / cost(b, 0)
        fixed = {n: (1.0 if n == 0 else tau[n]) / c / plain for n in [0, *sizes] if (c := cost(b, n))}
        best = max(fixed, key=fixed.get)
        runs = [simulate(sizes, tau, cost, b, args.steps, args.noise, s) for s in range(args.seeds)]
        policy = sum(r[0] for r in runs) / len(runs) / b / plain
        chosen = sum((r[1] for r in runs), Counter())
        share = ", ".join(f"{n}: {c / sum(chosen.values()):.0%}" for n, c in chosen.most_common(3))
        print(f"{b:>5} {policy:7.3f} {fixed[best]:7.3f} {best:>5}  "
              + " ".join(f"{n}:{x:.2f}" for n, x in fixed.items()) + f"   chose {share}")


if __name__ == "__main__":
    main()
