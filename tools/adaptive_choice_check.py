"""How good were the measured adaptive rule's choices? Offline, from throughput JSONs (CPU).

An adaptive configuration's ``summary.medusa_stats[config].adaptive`` holds two views of the
step costs of each batch-size bucket: ``ms_per_step``, the rule's own state at the end of the
run (the median of each choice's last clean steps, what it decides on), and ``steps``, the mean
ms of every step each choice ran (many more samples; steps with a prefill kept apart as
"mixed"). Per bucket this takes the choice the rule's medians make (τ / ms, no drafts counted
SPECULATION_MARGIN higher, as the rule does) and scores it with the all-step means, as a
fraction of the best choice's tokens per ms there (no drafts without the margin: a pick of no
drafts over a tree less than 10% ahead shows as a loss, as the rule means it to). ``--pooled``
also scores an alternative estimator: the trees' medians replaced by one line in their node
count (least squares, each tree one point, slope ≥ 0), the idea that a step's cost changes
smoothly with the tree. ``--fixed N`` scores a fixed
choice the same way (N = 63: what the fixed 63-node tree leaves to gain), over the buckets
where it ran.

    python tools/adaptive_choice_check.py benchmarks/results/throughput_h100*.json --pooled --fixed 63

Only choices with at least ``--min-steps`` steps in a bucket take part, and only buckets with two
of them. The all-step means are not the truth either (a choice's steps come from the periods it
ran), so read small differences as noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_vllm.adaptive import SPECULATION_MARGIN  # noqa: E402


def pick(ms: dict[int, float], tau: dict[int, float]) -> int:
    """The draft count (0: none) with the most tokens per ms, as the measured rule ranks them."""
    score = {n: (SPECULATION_MARGIN if n == 0 else tau[n]) / c for n, c in ms.items()}
    return max(score, key=score.get)


def pooled(ms: dict[int, float]) -> dict[int, float]:
    """The trees' ms on one line in their node count (slope >= 0); no drafts keeps its own."""
    pts = [(n, s) for n, s in ms.items() if n]
    if len(pts) < 2:
        return dict(ms)
    mean_n = statistics.mean(n for n, _ in pts)
    mean_s = statistics.mean(s for _, s in pts)
    var = sum((n - mean_n) ** 2 for n, _ in pts)
    slope = max(0.0, sum((n - mean_n) * (s - mean_s) for n, s in pts) / var)
    a = mean_s - slope * mean_n
    return dict(ms) if a <= 0 else {n: s if n == 0 else a + slope * n for n, s in ms.items()}


def check(adaptive: dict, min_steps: int) -> list[dict]:
    """Per bucket: the best choice by the all-step means, the rule's pick and the pooled pick,
    each pick's score as a fraction of the best's."""
    tau = {int(n): t for n, t in adaptive["tau"].items()} | {0: 1.0}
    rows = []
    for bucket, row in adaptive["ms_per_step"].items():
        steps = adaptive.get("steps", {}).get(bucket, {})
        mean = {int(n): s["ms"] for n, s in steps.items()
                if n != "mixed" and s.get("ms") and s["steps"] >= min_steps}
        median = {int(n): ms for n, ms in row.items() if int(n) in mean}
        if len(median) < 2:
            continue
        truth = {n: tau[n] / mean[n] for n in median}  # tokens per ms (no drafts: 1 a request)
        best = max(truth, key=truth.get)
        rule, pool = pick(median, tau), pick(pooled(median), tau)
        rows.append({"bucket": bucket, "best": best, "rule": rule, "rule_share": truth[rule] / truth[best],
                     "pooled": pool, "pooled_share": truth[pool] / truth[best],
                     "shares": {n: t / truth[best] for n, t in truth.items()}})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="throughput JSONs (those without an adaptive configuration are skipped)")
    ap.add_argument("--min-steps", type=int, default=10, help="steps a choice needs in a bucket to be compared")
    ap.add_argument("--pooled", action="store_true", help="also score the pooled (one line per bucket) estimator")
    ap.add_argument("--fixed", type=int, default=None, help="also score this fixed draft count (e.g. 63: the "
                    "fixed 63-node tree) in the buckets where it ran")
    args = ap.parse_args(argv)
    shares: dict[str, list[float]] = {"rule": [], "pooled": []}
    for path in args.results:
        stats = json.loads(Path(path).read_text()).get("summary", {}).get("medusa_stats") or {}
        for config, st in stats.items():
            adaptive = (st or {}).get("adaptive")
            if not adaptive or "steps" not in adaptive:
                continue
            for r in check(adaptive, args.min_steps):
                shares["rule"].append(r["rule_share"])
                shares["pooled"].append(r["pooled_share"])
                if args.fixed is not None and args.fixed in r["shares"]:
                    shares.setdefault(f"fixed {args.fixed}", []).append(r["shares"][args.fixed])
                extra = f"  pooled {r['pooled']:>2} ({r['pooled_share']:.3f})" if args.pooled else ""
                print(f"{Path(path).name} {config} {r['bucket']:>6}: best {r['best']:>2}, "
                      f"rule {r['rule']:>2} ({r['rule_share']:.3f}){extra}")
    if not shares["rule"]:
        sys.exit("no adaptive configuration with per-step counts (medusa_stats.adaptive.steps) in "
                 + ", ".join(args.results))
    for name, s in shares.items():
        if name == "pooled" and not args.pooled:
            continue
        print(f"{name}: {len(s)} bucket decisions, mean share of the best {statistics.mean(s):.4f}, "
              f"below 0.95 in {sum(x < 0.95 for x in s)}")


if __name__ == "__main__":
    main()
