"""GPU micro-benchmark, no vLLM: what the uniform verify step costs after the forward pass
(verification, the heads, the next drafts; the KV move left out), greedy against sampled, per
tree and batch size, at SmolLM2-135M's shapes (hidden 576, 4 heads over a 49,152 vocabulary),
CUDA-graphed with BatchGraphs as the runners do (the inputs copied into the static buffers
included: the sampled step's logits are rows × vocabulary).

Variants (``--variants``):
- ``greedy``: the greedy step, from the target argmax of each row (the argmax itself included,
  as the runners compute it before the replay);
- ``sampled``: temperature 0.8, no top-k/top-p (the set without the filter), random numbers as
  [B, 2] keys hashed inside the graph (the V2 runner's input); the walk the one ``MEDUSA_VLLM_REJECTION_WALK`` names
  (:mod:`medusa_vllm.vllm_plugin.rejection_walk`: ``kernel`` or ``tensor``);
- ``top-p``: the same with top-p 0.95: each tree level's filter (vLLM's op when vLLM imports,
  as the runners install it on a GPU, or the one ``MEDUSA_VLLM_TOP_K_TOP_P`` names, e.g.
  ``medusa``: medusa_vllm's target_probs op; else the reference sort);
- ``top-p-uniforms``: top-p with the uniforms themselves as the input (the V1 runner's).

Per row: wall µs per step over back-to-back steps (host launch and GPU time overlap as in an
engine), and host µs per call. Per tree and batch size also the GPU time of the sampled step's
candidate parts (``components``): the logits copy into the static buffer, the greedy argmax
over every row, one tree level's target distribution with and without top-p (five levels a
step for the 63-node tree). ``--profile``: each variant's eager step at the largest batch
size under the torch profiler, its kernels by GPU time (the top ``--top``), so the sampled
step's extra time can be put on its parts.

    PYTHONPATH=. python3 tools/gpu/verify_step_cost.py [--trees default-63 sparse-31]
        [--batch-sizes 1 8 32 64] [--steps 200] [--profile] [--out X.json]

On a machine without CUDA it runs the same steps eagerly (a check of the script, not a
measurement); ``--vocab`` shrinks the vocabulary for that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medusa_vllm.graphed_step import (  # noqa: E402
    BatchGraphs, capture_stream, greedy_tree_step, on_stream, sampled_tree_step)
from medusa_vllm.sampling import StepRandomness  # noqa: E402
from medusa_vllm.tree import get_tree  # noqa: E402
from medusa_vllm.tree_tensors import TreeTensors  # noqa: E402

HIDDEN, HEADS, TOPK = 576, 4, 10
VARIANTS = ("greedy", "sampled", "top-p", "top-p-uniforms")


def make_propose(trees: TreeTensors, w: torch.Tensor, vocab: int):
    """[B, H] -> [B, T] drafts of tree 0: the heads' top-k (one matmul for the four heads; the
    bundled heads' residual blocks are 576 x 576, small beside it), gathered in BFS order."""
    head_idx = (trees.depths[0, 1:] - 1).clamp_min(0)
    rank_idx = trees.ranks[0, 1:].clamp_min(0)

    def propose(h):
        ids = (h.to(w.dtype) @ w).view(h.shape[0], HEADS, vocab).topk(TOPK, dim=-1).indices
        return ids[:, head_idx, rank_idx]

    return propose


def make_fn(variant: str, trees: TreeTensors, propose):
    if variant == "greedy":
        def fn(logits, drafts, hidden, tree_ids):
            return greedy_tree_step(logits.argmax(dim=-1), drafts, hidden, tree_ids, trees, propose).as_tuple()
        return fn
    filtered = variant != "sampled"

    def fn(logits, drafts, hidden, tree_ids, params, rand):
        return sampled_tree_step(logits, drafts, hidden, tree_ids, params, rand, trees, propose,
                                 "rejection", filtered).as_tuple()
    return fn


def make_inputs(variant: str, b: int, q: int, trees: TreeTensors, vocab: int, g: torch.Generator) -> tuple:
    dev = g.device
    logits = (torch.randn(b * q, vocab, device=dev, generator=g) * 3).to(torch.bfloat16)
    # drafts mostly the target's favourite at their parent: paths of several lengths accepted
    at_parent = logits.float().argmax(-1).view(b, q).gather(1, trees.parents[0, 1:q].clamp_min(0).expand(b, -1))
    drafts = torch.where(torch.rand(b, q - 1, device=dev, generator=g) < 0.7, at_parent, 0).int().flatten()
    hidden = torch.randn(b * q, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16)
    tree_ids = torch.zeros(b, dtype=torch.int64, device=dev)
    if variant == "greedy":
        return logits, drafts, hidden, tree_ids
    top_p = 1.0 if variant == "sampled" else 0.95
    params = torch.tensor([0.8, 0.0, top_p, 0.0], device=dev).repeat(b, 1)
    if variant == "top-p-uniforms":
        rand = torch.rand(b, StepRandomness.flat_width(trees.max_depth + 1, trees.children.shape[2]),
                          device=dev, generator=g)
    else:
        rand = torch.stack([torch.randint(0, 2**62, (b,), device=dev, generator=g),
                            torch.randint(0, 2**20, (b,), device=dev, generator=g)], dim=1)
    return logits, drafts, hidden, tree_ids, params, rand


def rows_per_req(variant: str, q: int) -> list[int]:
    return [q, q - 1, q, 1] if variant == "greedy" else [q, q - 1, q, 1, 1, 1]


def measure(graphs: BatchGraphs, x: tuple, steps: int, sync) -> dict:
    for _ in range(10):
        graphs(*x)
    sync()
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        graphs(*x)
        host += time.perf_counter() - t
    sync()
    return {"wall_us_per_step": 1e6 * (time.perf_counter() - t0) / steps, "host_us_per_call": 1e6 * host / steps}


def time_component(fn, reps: int, iters: int, sync) -> float:
    """µs per call of ``fn`` (no inputs), GPU time: ``reps`` calls captured in one CUDA graph,
    replayed ``iters`` times (eager calls off CUDA)."""
    fn()
    sync()
    if torch.cuda.is_available():
        side = capture_stream("cuda")  # warm-up and capture as the runners' graphs do
        with on_stream(side):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(reps):
                fn()
        run = graph.replay
    else:
        def run():
            for _ in range(reps):
                fn()
    run()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    return 1e6 * (time.perf_counter() - t0) / (iters * reps)


def components(b: int, q: int, parents: int, vocab: int, g: torch.Generator, sync, iters: int) -> dict:
    """GPU µs of the sampled step's candidate parts at batch b, tree of q - 1 nodes: the copy of
    the logits (rows × vocabulary, bf16) into a static buffer, the greedy argmax over every row,
    one tree level's target distribution (B rows) with and without top-p 0.95, and the target
    distribution with top-p of every node that has children (root included: ``parents`` rows
    per request) in one call, the alternative to one call per level."""
    from medusa_vllm.sampling import SamplingBatch, target_probs

    dev = g.device
    logits = (torch.randn(b * q, vocab, device=dev, generator=g) * 3).to(torch.bfloat16)
    static = torch.empty_like(logits)
    rows = logits[:b]
    all_rows = logits[:b * parents]
    temp = torch.full((b,), 0.8, device=dev)
    top_k = torch.zeros(b, dtype=torch.int64, device=dev)
    with_p = SamplingBatch(temp, top_k, torch.full((b,), 0.95, device=dev), filtered=True)
    without = SamplingBatch(temp, top_k, torch.ones(b, device=dev), filtered=False)
    every = with_p.take(torch.arange(b, device=dev).repeat_interleave(parents))
    reps = 10 if dev.type == "cuda" else 1
    return {
        "logits_copy_us": time_component(lambda: static.copy_(logits), reps, iters, sync),
        "argmax_all_rows_us": time_component(lambda: logits.argmax(dim=-1), reps, iters, sync),
        "level_target_top_p_us": time_component(lambda: target_probs(rows, with_p), reps, iters, sync),
        "level_target_no_filter_us": time_component(lambda: target_probs(rows, without), reps, iters, sync),
        "parents_target_top_p_us": time_component(lambda: target_probs(all_rows, every), reps, iters, sync),
        "parent_rows_per_request": parents,
    }


def profile_kernels(fn, x: tuple, top: int) -> list[dict]:
    """The eager step's kernels (CUDA) or ops (CPU) by device time, three steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x[0].is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn(*x)
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn(*x)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key[:90], "us_per_step": getattr(e, key) / 3, "calls_per_step": e.count / 3}
            for e in events[:top]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs="+", default=["default-63", "sparse-31"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None, help="JSON results (shared/RESULTS.md envelope)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    filter_op = "reference sort"
    if dev == "cuda":
        try:
            from medusa_vllm.vllm_plugin import top_k_top_p

            names = {"vllm": "vLLM's op", "triton": "vLLM's Triton kernel", "medusa": "medusa_vllm target_probs"}
            if top_k_top_p.install(torch.device(dev), args.vocab):
                filter_op = names[top_k_top_p.chosen(torch.device(dev))]
        except ImportError:  # no vLLM here: the reference sort
            pass
    walk = "tensor"
    try:  # the walk of unfiltered steps (MEDUSA_VLLM_REJECTION_WALK), as the runners install it
        from medusa_vllm.vllm_plugin import rejection_walk

        walk = rejection_walk.install()
    except ImportError:
        pass
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(HIDDEN, HEADS * args.vocab, device=dev, generator=g).to(torch.bfloat16) * 0.05
    rows, profiles, comps = [], {}, []
    for name in args.trees:
        trees = TreeTensors.build([get_tree(name)], dev)
        q = trees.parents.shape[1]
        propose = make_propose(trees, w, args.vocab)
        parents = int((trees.children[0] >= 0).any(dim=1).sum())  # nodes with children, root included
        for variant in args.variants:
            fn = make_fn(variant, trees, propose)
            graphs = BatchGraphs(fn, rows_per_req(variant, q), max(args.batch_sizes), exact=3,
                                 name=f"{variant} {name}")
            graphs.enabled = dev == "cuda"
            for b in sorted(args.batch_sizes, reverse=True):
                assert graphs.capture(*make_inputs(variant, b, q, trees, args.vocab, g)) == graphs.enabled
            for b in args.batch_sizes:
                x = make_inputs(variant, b, q, trees, args.vocab, g)
                row = {"tree": name, "variant": variant, "batch_size": b, "graphs": graphs.enabled,
                       **measure(graphs, x, args.steps, sync)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.profile:
                b = max(args.batch_sizes)
                profiles[f"{name}/{variant}/bs{b}"] = kernels = profile_kernels(
                    fn, make_inputs(variant, b, q, trees, args.vocab, g), args.top)
                print(f"== {name} {variant} bs{b} (eager, per step)")
                for k in kernels:
                    print(f"   {k['us_per_step']:9.1f} us  {k['calls_per_step']:5.1f}x  {k['name']}")
            del graphs
        for b in args.batch_sizes:
            parts = {"tree": name, "batch_size": b, **components(b, q, parents, args.vocab, g, sync, max(args.steps // 10, 1))}
            comps.append(parts)
            print(json.dumps(parts), flush=True)
    summary = summarize(rows) | {"components": comps}
    print(json.dumps(summary, indent=1))
    if args.out:
        from training.report import device_name, envelope, write_json

        config = {k: getattr(args, k) for k in ("trees", "batch_sizes", "variants", "steps", "vocab")}
        config["filter"] = filter_op
        config["walk"] = walk
        write_json(args.out, envelope("verify_step_cost", device=device_name(), config=config, rows=rows,
                                      summary=summary | {"profiles": profiles}))
        print("wrote", args.out)


def summarize(rows: list[dict]) -> dict:
    """Per tree and batch size: each variant's wall µs per step and its excess over greedy."""
    out: dict = {}
    for r in rows:
        key = f"{r['tree']}/bs{r['batch_size']}"
        out.setdefault(key, {})[r["variant"]] = round(r["wall_us_per_step"], 1)
    for cell in out.values():
        if "greedy" in cell:
            for v in [v for v in cell if v != "greedy"]:
                cell[f"{v}_minus_greedy"] = round(cell[v] - cell["greedy"], 1)
    return {"wall_us_per_step": out, "median_host_us_per_call": round(statistics.median(
        r["host_us_per_call"] for r in rows), 1) if rows else None}


if __name__ == "__main__":
    main()
