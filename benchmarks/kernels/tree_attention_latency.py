"""Latency of one tree_attention call at the batches where vLLM's step is latency-bound.

The shape is the bundled model's (SmolLM2-135M: 9 query / 3 KV heads, head dim 64), the block
table is as wide as vLLM's (max_model_len / block_size: the launch sizes its split-KV wave from
it), and `--layers` calls are captured in one CUDA graph, as a model forward makes them. Per
point (batch, context, tree window, split count):
- us_per_call: CUDA-graph replays timed with CUDA events, divided by the calls;
- kernels_us: each kernel's own GPU time per call (torch.profiler over eager calls): the
  attention kernel and, with more than one split, the merge of the splits.
"auto" is the launch's own split choice; integers force a split count (a tuning knob with no
effect on the result). Two builds compare by running this once per build (--label) and then
`--compare A.json B.json`.

    python benchmarks/kernels/tree_attention_latency.py [--label NAME] [--out DIR]
    python benchmarks/kernels/tree_attention_latency.py --compare OLD.json NEW.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
from medusa_vllm import kernels  # noqa: E402
from medusa_vllm.kernels import testing as kt  # noqa: E402
from training.report import envelope  # noqa: E402
from tree_attention import gpu_short_name  # noqa: E402


def make_problem(batch: int, context: int, q_len: int, *, num_q_heads: int = 9, num_kv_heads: int = 3,
                 head_dim: int = 64, block_size: int = 16, max_model_len: int = 2048) -> kt.TreeAttentionProblem:
    """`batch` requests of `context` cached tokens + a q_len-token tree window (bf16, CUDA), the
    block table as wide as vLLM's; the defaults are SmolLM2-135M's shape."""
    p = kt.make_tree_attention_problem(
        q_lens=[q_len] * batch, ctx_lens=[context] * batch, tree_ids=[0] * batch,
        masks=[kt.medusa_mask(q_len - 1)], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=torch.bfloat16, device="cuda",
        cache_on_device_rng=True)
    width = -(-max_model_len // block_size)  # vLLM's block table: max_model_len wide
    table = torch.full((batch, width), -1, dtype=torch.int32, device="cuda")
    table[:, : p.block_table.shape[1]] = p.block_table
    p.block_table = table
    return p


def call(p: kt.TreeAttentionProblem, splits: int) -> None:
    # [N, Hq, D] out <- tree attention of q over the paged cache (the op itself: no host checks)
    torch.ops.medusa_vllm.tree_attention(p.out, *p.args()[1:], p.scale, 0.0, splits)


def graph_us_per_call(p, splits: int, layers: int, replays: int) -> float:
    call(p, splits)  # the launch's one-time attribute and occupancy queries, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            call(p, splits)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (replays * layers))
    del graph
    return sorted(times)[len(times) // 2]


def kernel_us_per_call(p, splits: int, calls: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        call(p, splits)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call(p, splits)
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        name = evt.key
        kind = "attention" if "tree_attention_kernel" in name else "merge" if "merge_splits" in name else None
        if kind:
            device_us = getattr(evt, "self_device_time_total", None)
            if device_us is None:
                device_us = evt.self_cuda_time_total
            out[kind] += device_us / calls
    return dict(out)


def measure(args) -> list[dict]:
    rows = []
    for q_len in args.q_lens:
        for context in args.contexts:
            for batch in args.batches:
                p = make_problem(batch, context, q_len, num_q_heads=args.num_q_heads,
                                 num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                                 block_size=args.block_size, max_model_len=args.max_model_len)
                expected = p.out.clone()
                kernels.tree_attention_ref(expected, *p.args()[1:], p.scale)
                sweep = ["auto"] + (list(args.splits) if batch in args.sweep_batches else [])
                for splits in sweep:
                    n = 0 if splits == "auto" else int(splits)
                    p.out.fill_(float("nan"))
                    call(p, n)
                    err = (p.out.float() - expected.float()).abs().max().item()
                    row = dict(batch=batch, context=context, q_len=q_len, splits=splits, max_abs_err=err,
                               us_per_call=graph_us_per_call(p, n, args.layers, args.replays),
                               kernels_us=kernel_us_per_call(p, n, args.profile_calls))
                    rows.append(row)
                    ks = " ".join(f"{k} {v:6.2f}" for k, v in sorted(row["kernels_us"].items()))
                    print(f"{batch:>4} {context:>6} {q_len:>4} {str(splits):>5} {row['us_per_call']:>8.2f} us/call"
                          f"  [{ks}]  err {err:.3g}", flush=True)
                del p, expected
                torch.cuda.empty_cache()
    return rows


def run_name(result: dict) -> str:
    """Label and commit of a run."""
    return f"{result['config']['label']} ({result['git_commit']})"


def compare(old_path: str, new_path: str) -> None:
    old, new = (json.load(open(path)) for path in (old_path, new_path))
    key = lambda r: (r["batch"], r["context"], r["q_len"], str(r["splits"]))  # noqa: E731
    before = {key(r): r for r in old["rows"]}
    print(f"{run_name(old)} -> {run_name(new)}, {new['device']}\n"
          f"{'B':>4} {'ctx':>6} {'q':>4} {'splits':>6} {'old us':>8} {'new us':>8} {'new/old':>8}")
    for r in new["rows"]:
        o = before.get(key(r))
        if o:
            print(f"{r['batch']:>4} {r['context']:>6} {r['q_len']:>4} {str(r['splits']):>6} {o['us_per_call']:>8.2f} "
                  f"{r['us_per_call']:>8.2f} {r['us_per_call'] / o['us_per_call']:>8.2f}")


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for r in rows:
        if r["splits"] != "auto":
            continue
        forced = [x for x in rows if (x["batch"], x["context"], x["q_len"]) == (r["batch"], r["context"], r["q_len"])
                  and x["splits"] != "auto"]
        best = min(forced, key=lambda x: x["us_per_call"]) if forced else None
        summary[f"b{r['batch']}_ctx{r['context']}_q{r['q_len']}"] = {
            "auto_us": round(r["us_per_call"], 2),
            "best_forced_us": round(best["us_per_call"], 2) if best else None,
            "best_forced_splits": best["splits"] if best else None}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="head")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print new/old per point and exit")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--q-lens", type=int, nargs="+", default=[16, 64], help="tree nodes + 1")
    ap.add_argument("--splits", nargs="+", default=["1", "4", "16", "32"], help="forced split counts")
    ap.add_argument("--sweep-batches", type=int, nargs="*", default=[1, 8], help="batches with forced splits")
    ap.add_argument("--num-q-heads", type=int, default=9)
    ap.add_argument("--num-kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=30, help="calls per captured graph (SmolLM2-135M: 30)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--profile-calls", type=int, default=30)
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if not torch.cuda.is_available():
        sys.exit("tree_attention_latency: needs a CUDA GPU")
    if not kernels.have_extension():
        sys.exit(f"tree_attention_latency: {kernels.extension_error()}")
    device = torch.cuda.get_device_name()
    start = time.monotonic()
    print(f"{device} ({args.label})\n{'B':>4} {'ctx':>6} {'q':>4} {'split':>5}",
          flush=True)
    rows = measure(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tree_attention_latency_{gpu_short_name(device)}_{args.label}.json")
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "out")}
    config |= {"timing": "CUDA-graph replay of `layers` calls, CUDA events, median of 5; kernels: torch.profiler",
               "wall_s": round(time.monotonic() - start, 1)}
    result = envelope("tree_attention_latency", device=device, config=config, rows=rows, summary=summarize(rows))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
