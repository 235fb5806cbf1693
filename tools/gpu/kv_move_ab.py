"""GPU micro-benchmark, no vLLM: the uniform greedy step of the 63-node tree at SmolLM2-135M's
shapes (30 layers, 3 KV heads of 64, hidden 576, 4 heads over a 49,152 vocabulary), CUDA-graphed
with BatchGraphs, with the accepted-KV move inside the graph ("graph") or as a separate launch
after the replay ("eager", the earlier design). Prints host microseconds per call (no sync) and
wall microseconds per step over back-to-back steps, per batch size.

    PYTHONPATH=. python3 tools/gpu/kv_move_ab.py [--steps 300] [--batch-sizes 1 8 64] [--out X.json]

--out writes the rows and, per batch size, the median of each placement (shared/RESULTS.md
envelope; benchmarks/results/kv_move_ab_micro_h200.json came from this run, 2026-12-05).

On a machine without CUDA it runs the same steps eagerly (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from medusa_vllm import kernels
from medusa_vllm.graphed_step import BatchGraphs, greedy_tree_step
from medusa_vllm.tree import get_tree
from medusa_vllm.tree_tensors import TreeTensors

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, HEADS, VOCAB, TOPK = 30, 3, 64, 576, 4, 49152, 10
BLOCKS, BLOCK = 4096, 16


def make_step(in_graph: bool, caches, trees, w):
    k_caches, v_caches = caches
    head_idx = (trees.depths[:, 1:] - 1).clamp_min(0)[0]
    rank_idx = trees.ranks[:, 1:].clamp_min(0)[0]

    def propose(h):  # [B, H] -> [B, T]
        ids = (h @ w).view(h.shape[0], HEADS, VOCAB).topk(TOPK, dim=-1).indices
        return ids[:, head_idx, rank_idx]

    def move(slots, accepted):
        b = accepted.shape[0]
        q = slots.shape[0] // b
        starts = torch.arange(0, (b + 1) * q, q, dtype=torch.int32, device=slots.device)
        kernels.move_accepted_kv(k_caches, v_caches, slots, starts, accepted, check=False)

    def fn(argmax, drafts, hidden, tree_ids, slots):
        out = greedy_tree_step(argmax, drafts, hidden, tree_ids, trees, propose)
        if in_graph:
            move(slots, out.accepted)
        return out.as_tuple()

    return fn, move


def inputs(b, q, g):
    dev = g.device
    argmax = torch.randint(0, 2, (b * q,), device=dev, generator=g)
    drafts = torch.randint(0, 2, (b * (q - 1),), device=dev, generator=g).int()
    hidden = torch.randn(b * q, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16)
    slots = torch.randperm(BLOCKS * BLOCK, device=dev, generator=g)[: b * q]
    return argmax, drafts, hidden, torch.zeros(b, dtype=torch.int64, device=dev), slots


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--out", default=None, help="JSON results (shared/RESULTS.md envelope)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tree = get_tree("default-63")
    trees = TreeTensors.build([tree], dev)
    q = 1 + tree.num_nodes
    shape = (BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    caches = ([torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)],
              [torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)])
    w = torch.randn(HIDDEN, HEADS * VOCAB, device=dev, dtype=torch.bfloat16) * 0.05
    g = torch.Generator(device=dev).manual_seed(0)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    results = []
    for mode in ("graph", "eager", "graph", "eager"):  # twice each, alternating
        fn, move = make_step(mode == "graph", caches, trees, w)
        graphs = BatchGraphs(fn, [q, q - 1, q, 1, q], max(args.batch_sizes), exact=3, name=mode,
                             pad=[None, -1, None, None, -1])
        graphs.enabled = dev == "cuda"
        for b in sorted(args.batch_sizes, reverse=True):
            assert graphs.capture(*inputs(b, q, g)) == graphs.enabled
        for b in args.batch_sizes:
            x = inputs(b, q, g)

            def step():
                out = graphs(*x)
                if mode == "eager":
                    move(x[4], out[1])
                return out

            for _ in range(20):
                step()
            sync()
            host = 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                host += time.perf_counter() - t
            sync()
            row = {"mode": mode, "batch_size": b, "device": dev, "graphs": graphs.enabled,
                   "host_us_per_call": 1e6 * host / args.steps,
                   "wall_us_per_step": 1e6 * (time.perf_counter() - t0) / args.steps}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write(args, results)


def write(args, rows: list[dict]) -> None:
    from training.report import device_name, envelope, write_json

    device = device_name()
    summary: dict = {"device": device, "cuda_graphs": bool(rows and rows[0]["graphs"])}
    for b in args.batch_sizes:
        for mode in ("graph", "eager"):
            for key in ("host_us_per_call", "wall_us_per_step"):
                vals = [r[key] for r in rows if r["batch_size"] == b and r["mode"] == mode]
                summary[f"{key}_{mode}_bs{b}"] = round(statistics.median(vals), 1)
    config = {"steps": args.steps, "batch_sizes": args.batch_sizes, "tree": "default-63"}
    write_json(args.out, envelope("kv_move_ab", device=device, config=config, rows=rows, summary=summary))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
