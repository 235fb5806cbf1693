"""What a closed round's tail costs a tree: every request of a round gets the same output length,
so without speculation all b finish at step L, but with a tree each request needs its own number
of steps (L over its own accepted length) and the round lasts as long as its slowest request.

``steps``: per-request verification steps of Medusa trees on the first N MT-Bench questions
(the PyTorch reference engine, :class:`medusa_vllm.reference.MedusaReference`, greedy, float32,
the bundled model and heads, ``--max-tokens`` each, EOS ignored as benchmarks/throughput.py does);
slow on a CPU (about 10 minutes a tree for 64 prompts).

``model``: from those steps and a GPU run's step costs (a throughput JSON with an adaptive engine:
its ``ms_per_step`` per tree and bucket of running requests; the baseline's median time per
output token), the closed-round ratio per tree and batch size two ways: every step at the full
batch (steps = the round's mean) and with the tail (the round runs until its slowest request, each
step at the cost of the requests still running). Steps with a prefill are in neither.

Usage: python tools/closed_round_tail.py steps --trees sparse-15 default-63 --num-prompts 64 \\
           --out benchmarks/results/closed_round_steps_cpu.json
       python tools/closed_round_tail.py model --steps benchmarks/results/closed_round_steps_cpu.json \\
           --run benchmarks/results/throughput_h100_closed_flash_b_e8593b1.json --adaptive adaptive-v2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def request_steps(trees: list[str], num_prompts: int, max_tokens: int) -> list[dict]:
    """One row per tree: its accepted length τ and each request's verification steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.bundled import bundled_heads_path, bundled_model_path
    from medusa_vllm.checkpoint import load_heads
    from medusa_vllm.prompts import chat, mt_bench_questions
    from medusa_vllm.reference import MedusaReference

    model_dir = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    heads = load_heads(bundled_heads_path()).float()
    prompts = [tok(p, add_special_tokens=False).input_ids
               for p in chat(tok, mt_bench_questions()[:num_prompts])]
    out = []
    for tree in trees:
        res = MedusaReference(model, heads, tree).generate(prompts, max_tokens)
        out.append({"tree": tree, "tau": res.tau, "steps": res.steps})
        print(f"{tree}: tau {res.tau:.3f}, steps per request mean {statistics.mean(res.steps):.1f} "
              f"max {max(res.steps)} min {min(res.steps)}", flush=True)
    return out


def bucket_costs(ms_per_step: dict, tree_size: int) -> dict[int, float]:
    """{running requests (a bucket's upper end): ms} of one tree from an adaptive run's table."""
    out = {}
    for bucket, row in ms_per_step.items():
        if str(tree_size) in row:
            out[int(bucket.split("-")[-1])] = row[str(tree_size)]
    return out


def interp(table: dict[int, float], n: float) -> float:
    """Piecewise-linear in the number of running requests, flat past the ends."""
    xs = sorted(table)
    return float(np.interp(n, xs, [table[x] for x in xs]))


def round_ratios(steps: list[int], b: int, max_tokens: int, plain_ms: float,
                 tree_ms: dict[int, float]) -> tuple[float, float]:
    """(uniform, with tail) ratios of the closed rounds of ``b`` of these requests."""
    base = max_tokens * plain_ms  # a round without speculation
    uniform, tail = [], []
    for i in range(0, len(steps) - b + 1, b):
        r = steps[i: i + b]
        uniform.append(base / (statistics.mean(r) * interp(tree_ms, b)))
        tail.append(base / sum(interp(tree_ms, sum(s >= k for s in r)) for k in range(1, max(r) + 1)))
    return statistics.mean(uniform), statistics.mean(tail)


def model(steps: dict, run: dict, adaptive: str, max_tokens: int) -> list[dict]:
    from medusa_vllm.tree import get_tree

    stats = run["summary"].get("medusa_stats", {}).get(adaptive, {}).get("adaptive")
    if stats is None:
        raise SystemExit(f"closed_round_tail: the run has no adaptive configuration {adaptive!r} "
                         f"with a step-cost table; pass --adaptive one of "
                         f"{sorted(run['summary'].get('medusa_stats', {}))}")
    plain = {r["batch_size"]: r["tpot_ms_median"] for r in run["rows"] if r["config"].startswith("baseline")}
    rows = []
    for tree, s in steps.items():
        tree_ms = bucket_costs(stats["ms_per_step"], len(get_tree(tree)))
        for b in sorted(plain):
            if b > len(s) or not tree_ms:
                continue
            uniform, tail = round_ratios(s, b, max_tokens, plain[b], tree_ms)
            rows.append({"tree": tree, "batch_size": b, "ratio_uniform": uniform, "ratio_with_tail": tail})
            print(f"{tree:>12} bs {b:>3}: every step at the full batch {uniform:.2f}x, with the tail {tail:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["steps", "model"])
    ap.add_argument("--trees", nargs="+", default=["sparse-15", "default-63"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", help="model: the JSON the steps mode wrote")
    ap.add_argument("--run", help="model: a throughput JSON with an adaptive configuration")
    ap.add_argument("--adaptive", default="adaptive-v2")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.mode == "model" and not (args.steps and args.run):
        ap.error("model needs --steps (a JSON the steps mode wrote) and --run (a throughput JSON)")
    from benchmarks.common import write_envelope

    if args.mode == "steps":
        config = {"trees": args.trees, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                  "engine": "medusa_vllm.reference, float32, greedy, bundled model and heads"}
        rows = request_steps(args.trees, args.num_prompts, args.max_tokens)
        summary = {r["tree"]: {"tau": r["tau"], "steps_mean": statistics.mean(r["steps"]),
                               "steps_max": max(r["steps"])} for r in rows}
    else:
        data = json.loads(Path(args.steps).read_text())
        run = json.loads(Path(args.run).read_text())
        config = {"steps": args.steps, "run": args.run, "adaptive": args.adaptive,
                  "device_of_run": run["device"]}
        steps = {r["tree"]: r["steps"] for r in data["rows"]}
        rows = model(steps, run, args.adaptive, data["config"]["max_tokens"])
        summary = {}
    if args.out:
        write_envelope(Path(args.out), f"closed_round_tail_{args.mode}", config, rows, summary)


if __name__ == "__main__":
    main()
