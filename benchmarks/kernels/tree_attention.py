"""Tree attention over vLLM's paged KV cache on one GPU: medusa_vllm's kernel against
(a) FlexAttention (compiled, block mask over the gathered KV), (b) SDPA with a dense boolean
mask over the gathered KV, (c) FlashInfer paged prefill with a custom mask, (d) xformers'
tree_attention (paged prefix over the same cache + tree suffix, merged; Triton split-K ops).
(c) and (d) are optional: when they cannot be imported or run, their columns are null and the
exact error is recorded.

Every request has `context` cached tokens plus a Medusa tree window of q_len = nodes + 1 tokens
(root + the first nodes of mc_sim_7b_63). Times are GPU medians of triton.testing.do_bench (L2
flushed between runs); the alternatives are timed on already gathered, contiguous K/V (the
gather is not counted against them). Bandwidth = bytes of K and V read once / time.

    python benchmarks/kernels/tree_attention.py [--quick] [--out DIR] [--time-budget S]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),  # tree_attention_baselines
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]  # medusa_vllm
import tree_attention_baselines as baselines  # noqa: E402
from medusa_vllm import kernels  # noqa: E402
from medusa_vllm.kernels import testing as kt  # noqa: E402
from training.report import git_commit  # noqa: E402 ($MEDUSA_GIT_COMMIT first: stale .git on GPU copies)

PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                  "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12}
ALTERNATIVES = ("flex", "sdpa", "flashinfer", "xformers")


@dataclass(frozen=True)
class Config:
    batches: tuple[int, ...] = (1, 8, 32, 128)
    contexts: tuple[int, ...] = (512, 4096, 16384)
    tree_nodes: tuple[int, ...] = (16, 63)
    head_dims: tuple[int, ...] = (64, 128)
    num_q_heads: int = 14  # Qwen2.5-0.5B-like GQA 14/2
    num_kv_heads: int = 2
    block_size: int = 16
    dtype: str = "bfloat16"
    seed: int = 0
    timing: str = "triton.testing.do_bench median, warmup 25 ms, rep 100 ms, L2 flushed"

    @classmethod
    def quick(cls) -> Config:
        return cls(batches=(8, 32), contexts=(4096,), tree_nodes=(16, 63), head_dims=(128,))


@dataclass(frozen=True)
class Point:
    batch: int
    context: int
    tree_nodes: int
    head_dim: int


def peak_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in device_name), None)


def gpu_short_name(device_name: str) -> str:
    match = re.search(r"(GH200|H200|H100|B200|A100|L40S|L4|A10G)", device_name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def time_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_problem(point: Point, cfg: Config) -> baselines.Problem:
    q_len = point.tree_nodes + 1
    masks = [kt.medusa_mask(point.tree_nodes)]
    p = kt.make_tree_attention_problem(
        q_lens=[q_len] * point.batch, ctx_lens=[point.context] * point.batch, tree_ids=[0] * point.batch,
        masks=masks, num_q_heads=cfg.num_q_heads, num_kv_heads=cfg.num_kv_heads, head_dim=point.head_dim,
        block_size=cfg.block_size, dtype=getattr(torch, cfg.dtype), device="cuda", seed=cfg.seed,
        cache_on_device_rng=True)
    return baselines.Problem(p, masks[0].cuda())


def measure(point: Point, cfg: Config, peak: float | None) -> dict:
    row = asdict(point) | {"q_len": point.tree_nodes + 1, "errors": {}}
    problem = make_problem(point, cfg)
    kv_bytes = problem.kv_bytes()
    ours_fn, ours_out = baselines.ours(problem)
    row["ours_us"] = time_us(ours_fn)
    row["kv_bytes"] = kv_bytes
    row["ours_tbps"] = kv_bytes / row["ours_us"] / 1e6
    row["bandwidth_fraction"] = kv_bytes / (row["ours_us"] * 1e-6) / peak if peak else None
    for name in ALTERNATIVES:
        row[f"{name}_us"] = row[f"speedup_vs_{name}"] = row[f"max_abs_err_{name}"] = None
        try:
            fn, out, info = getattr(baselines, name)(problem)
            row[f"max_abs_err_{name}"] = (out.float() - ours_out.float()).abs().max().item()
            row[f"{name}_us"] = time_us(fn)
            row[f"speedup_vs_{name}"] = row[f"{name}_us"] / row["ours_us"]
            if info:
                row[f"{name}_info"] = info
        except Exception as exc:  # noqa: BLE001 - an alternative that fails is recorded, not fatal
            row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        torch.cuda.empty_cache()
    del problem
    torch.cuda.empty_cache()
    return row


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: list[dict], skipped: list[dict]) -> dict:
    summary = {f"geomean_speedup_vs_{name}": geomean([r[f"speedup_vs_{name}"] for r in rows
                                                       if r.get(f"speedup_vs_{name}")]) for name in ALTERNATIVES}
    fractions = [r["bandwidth_fraction"] for r in rows if r.get("bandwidth_fraction")]
    summary["max_bandwidth_fraction"] = max(fractions) if fractions else None
    long_rows = [r["bandwidth_fraction"] for r in rows if r["context"] >= 4096 and r.get("bandwidth_fraction")]
    summary["median_bandwidth_fraction_ctx_ge_4096"] = sorted(long_rows)[len(long_rows) // 2] if long_rows else None
    summary["skipped_points"] = skipped
    return summary


def table_header() -> str:
    head = f"{'B':>4} {'ctx':>6} {'q':>3} {'D':>4} {'ours us':>9} {'TB/s':>6} {'%peak':>6}"
    return head + "".join(f" {n + ' us':>13} {'x':>6}" for n in ALTERNATIVES)


def table_line(r: dict) -> str:
    frac = f"{100 * r['bandwidth_fraction']:6.1f}" if r.get("bandwidth_fraction") else f"{'-':>6}"
    line = f"{r['batch']:>4} {r['context']:>6} {r['q_len']:>3} {r['head_dim']:>4} {r['ours_us']:>9.1f}"
    line += f" {r['ours_tbps']:>6.2f} {frac}"
    for n in ALTERNATIVES:
        us, x = r.get(f"{n}_us"), r.get(f"speedup_vs_{n}")
        line += f" {us:>13.1f} {x:>6.2f}" if us else f" {'-':>13} {'-':>6}"
    return line


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["head_dim"], r["q_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (d, q) in zip(axes[0], panels):
        for i, b in enumerate(sorted({r["batch"] for r in rows})):
            pts = sorted((r["context"], r["ours_us"], r.get("flex_us")) for r in rows
                         if (r["head_dim"], r["q_len"], r["batch"]) == (d, q, b))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"ours B={b}")
            flex = [(p[0], p[2]) for p in pts if p[2]]
            if flex:
                ax.plot(*zip(*flex), "x--", color=f"C{i}", alpha=0.6, label=f"flex B={b}")
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="us per call", title=f"D={d}, q_len={q}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    parser.add_argument("--quick", action="store_true", help="4 points instead of the full sweep")
    parser.add_argument("--time-budget", type=float, default=220.0, help="seconds; later points are skipped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tree_attention benchmark: needs a CUDA GPU")
    if not kernels.have_extension():
        sys.exit(f"tree_attention benchmark: {kernels.extension_error()}")
    cfg = Config.quick() if args.quick else Config()
    torch.manual_seed(cfg.seed)
    torch._dynamo.config.cache_size_limit = 64  # flex recompiles per shape class
    device = torch.cuda.get_device_name()
    peak = peak_bandwidth(device)
    points = [Point(b, c, t, d) for d in cfg.head_dims for t in cfg.tree_nodes for c in cfg.contexts for b in cfg.batches]
    rows, skipped, start = [], [], time.monotonic()
    print(f"{device}: {len(points)} points\n{table_header()}", flush=True)
    for point in points:
        if time.monotonic() - start > args.time_budget:
            skipped.append(asdict(point) | {"reason": "time budget"})
            continue
        try:
            rows.append(measure(point, cfg, peak))
            print(table_line(rows[-1]), flush=True)
        except torch.cuda.OutOfMemoryError as exc:
            skipped.append(asdict(point) | {"reason": f"OOM: {str(exc)[:200]}"})
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"tree_attention_{gpu_short_name(device)}")
    result = {
        "benchmark": "tree_attention",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "device": device,
        "software": baselines.software_versions(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "config": asdict(cfg) | {"peak_bandwidth_Bps": peak, "kv_layout": "vLLM NHD [nb, bs, Hkv, 2D], shuffled blocks",
                                  "alternatives_time_gathered_kv": True, "wall_s": round(time.monotonic() - start, 1)},
        "rows": rows,
        "summary": summarize(rows, skipped),
    }
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        plot(rows, stem + ".png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
