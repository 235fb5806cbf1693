"""What one decoding step costs: plain vLLM vs medusa_vllm trees vs vLLM's built-in Medusa.

    python benchmarks/step_cost.py --heads UNTRAINED_HEADS [--batch-sizes 1 8 32]

Untrained (zero-initialised) heads make acceptance ≈ 0, so every step emits about one token and
the per-step overhead is exposed. ms/step = wall time of a round ÷ verification steps per request
(tokens ÷ τ). Configurations run one engine each (``benchmarks/throughput.py`` machinery):
plain decoding with vLLM's default runner and with the V1 runner + async scheduling (the fastest
plain configuration on the H100), trees of 4 (chain), 16 and 64 nodes (64 also with
asynchronous scheduling), built-in Medusa K=4; greedy requests, and sampled ones (temperature
0.8, top-p 0.95) for plain decoding and the 64-node tree, both asynchronous.
With ``--profile`` each engine also runs one profiled round per batch size (torch profiler in
the worker, :mod:`medusa_vllm.profiling`): host time per step of vLLM's and medusa_vllm's step
regions, device time of the top kernels, CUDA runtime calls per step; the summaries go into the
JSON's ``profiles`` and the profiler tables next to it (``<out>.profile.txt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS, device_name, device_tag, envelope, run_isolated, write_envelope, write_json,
)
from benchmarks.throughput import builtin_layout, engine_for, measure, prompts_for  # noqa: E402

CONFIGS = {
    "plain_default": "baseline",
    "plain_v1_async": "baseline-v1async",
    "tree4_chain": "medusa:chain-4",
    "tree16": "medusa:sparse-15",
    "tree64": "medusa:default-63",
    "tree64_async": "medusa:default-63",  # + vLLM's asynchronous scheduler
    "builtin_medusa_k4": "builtin",
    # steps with fewer drafts than the engine's largest tree (what the load-adaptive tree runs):
    # a 63-node engine whose budget rule (16 tokens) drafts sparse-15 at batch 1, none from 2 on
    "tree16_in_tree64": "adaptive-budget",
    # a medusa_vllm engine whose budget rule (1 token) never drafts, asynchronous: what a step
    # costs when the load-adaptive tree picks no drafts (against plain_v1_async, the same runner)
    "nodraft_async": "adaptive-budget",
    # sampled requests (temperature and top-p): plain decoding against the 63-node tree, whose
    # uniform steps run the sampled fixed-shape step (random numbers drawn first, CUDA graphs)
    "plain_v1_async_sampled": "baseline-v1async",
    "tree64_async_sampled": "medusa:default-63",
    # vLLM's V2 model runner (asynchronous scheduler): its plain step against our V2 tree step
    "plain_v2_async": "baseline",
    "tree64_v2": "medusa-v2:default-63",
    "plain_v2_async_sampled": "baseline",
    "tree64_v2_sampled": "medusa-v2:default-63",
}
ADAPTIVE_MAX_TOKENS = {"tree16_in_tree64": 16, "nodraft_async": 1}
ASYNC = {"plain_v1_async", "tree64_async", "nodraft_async", "plain_v1_async_sampled", "tree64_async_sampled",
         "plain_v2_async", "plain_v2_async_sampled"}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # the *_sampled configs' requests


def _batch_sizes(rows: list[dict], name: str) -> list[int]:
    """The batch sizes config ``name`` measured (rows of failed engines have none)."""
    return sorted({r["batch_size"] for r in rows if r.get("config") == name and "batch_size" in r})


def summarize(rows: list[dict], device: str | None = None) -> dict:
    """The issue's headline figures from the rows of one or several runs (on ``device``, by
    default this machine's)."""
    device = device or device_name()

    def ms(name, b):
        return next((r["ms_per_step"] for r in rows if r.get("config") == name and r.get("batch_size") == b), None)

    def ratio(a, b):
        return a / b if a and b else None

    fastest1 = min((x for x in (ms("plain_default", 1), ms("plain_v1_async", 1)) if x), default=None)
    fastest32 = min((x for x in (ms("plain_default", 32), ms("plain_v1_async", 32)) if x), default=None)
    return {
        "plain_ms_bs1_default": ms("plain_default", 1),
        "plain_ms_bs1_fastest": fastest1,
        "tree64_ms_bs1": ms("tree64", 1), "tree16_ms_bs1": ms("tree16", 1),
        "tree4_chain_ms_bs1": ms("tree4_chain", 1),
        "builtin_medusa_k4_ms_bs1": ms("builtin_medusa_k4", 1),
        "tree64_vs_fastest_plain_bs1": ratio(ms("tree64", 1), fastest1),
        "plain_ms_bs32_fastest": fastest32,
        "tree64_ms_bs32": ms("tree64", 32), "tree16_ms_bs32": ms("tree16", 32),
        "builtin_medusa_k4_ms_bs32": ms("builtin_medusa_k4", 32),
        "tree64_vs_fastest_plain_bs32": ratio(ms("tree64", 32), fastest32),
        "tree64_async_ms_bs1": ms("tree64_async", 1), "tree64_async_ms_bs32": ms("tree64_async", 32),
        "tree64_async_vs_fastest_plain_bs1": ratio(ms("tree64_async", 1), fastest1),
        "tree64_async_vs_fastest_plain_bs32": ratio(ms("tree64_async", 32), fastest32),
        # the load-adaptive tree's "no drafts" step against plain decoding on the same runner
        "nodraft_async_vs_plain_v1_async": {
            b: ratio(ms("nodraft_async", b), ms("plain_v1_async", b))
            for b in _batch_sizes(rows, "nodraft_async")
        },
        "tree64_async_sampled_vs_plain_sampled": {
            b: ratio(ms("tree64_async_sampled", b), ms("plain_v1_async_sampled", b))
            for b in _batch_sizes(rows, "tree64_async_sampled")
        },
        "async": any(r.get("config") == "tree64_async" and "ms_per_step" in r for r in rows),
        "cuda_graphs": not device.startswith("cpu"),
        "cuda_graphs_mode": "vLLM default FULL_AND_PIECEWISE: uniform tree steps in FULL graphs; "
                            "verification + heads in medusa_vllm's per-batch-size graphs",
        "device": device,
    }


def merge(paths: list[str], out: Path) -> None:
    """One envelope from several runs of this script on the same machine (a GPU call holds
    about four engines): their rows together, the summary recomputed, each run's config kept."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    devices = {r["device"] for r in runs}
    if len(devices) != 1:
        raise SystemExit(f"step_cost --merge: runs from different devices {sorted(devices)}")
    rows = [row for r in runs for row in r["rows"] if "config" in row]
    profiles = {k: v for r in runs for row in r["rows"] for k, v in row.get("profiles", {}).items()}
    device = devices.pop()
    summary = summarize(rows, device)
    if profiles:
        rows.append({"profiles": profiles})
    config = {"merged_from": [{"command": r["command"], "git_commit": r["git_commit"],
                               "created": r["created"]} for r in runs]}
    write_json(out, envelope("step_cost", device=device, config=config, rows=rows, summary=summary))
    print("summary:", summary)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", default=None, help="untrained heads (acceptance ~ 0); required to measure")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="add a profiled round per batch size")
    ap.add_argument("--eager", action="store_true",
                    help="no CUDA graphs (vLLM's enforce_eager, medusa_vllm's cuda_graphs off): slower "
                         "steps, but a --profile then lists each kernel (a graph replay hides them)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="write one envelope (--out) from the rows of these earlier runs")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out) if args.out else RESULTS / f"step_cost_{device_tag()}.json")
    if not args.heads:
        ap.error("--heads (untrained heads) is required to measure")
    # fields engine_for reads
    args.max_model_len, args.gpu_memory_utilization, args.tensor_parallel_size = 2048, 0.3, 1
    args.acceptance, args.adaptive_tree, args.builtin_k, args.temperature = "rejection", "default-63", 4, 0.0

    from medusa_vllm.bundled import bundled_model_path

    args.model = args.model or str(bundled_model_path())
    out = Path(args.out) if args.out else RESULTS / f"step_cost_{device_tag()}.json"
    prompts = prompts_for(args)
    per_batch = {b: b * args.rounds for b in args.batch_sizes}
    builtin = builtin_layout(args.heads, args.model, out.parent / ".work")
    rows, profiles = [], {}
    gpu = device_tag() != "cpu"
    for name in args.configs:
        config = CONFIGS[name]
        args.adaptive_max_tokens = ADAPTIVE_MAX_TOKENS.get(name, 0)
        # (engine_for: V1 for baseline-v1async, "runner": "v2" and async scheduling for medusa-v2:)
        kw, env = engine_for(args, config, args.heads, builtin, gpu)
        if config.startswith("medusa"):
            env["MEDUSA_VLLM_SYNC_DEBUG"] = "warn"  # a host sync inside medusa_vllm's step warns
        if args.profile:
            env.update(VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_CUSTOM_SCOPES_FOR_PROFILING="1")
        if name in ASYNC:
            kw["async_scheduling"] = True
        if args.eager:
            kw["enforce_eager"] = True
            if config.startswith(("medusa", "adaptive")):  # medusa_vllm's own key (not the built-in's)
                kw["speculative_config"]["cuda_graphs"] = False
        try:
            sampling = SAMPLED if name.endswith("_sampled") else {"temperature": 0.0}
            res = run_isolated(measure, kw, prompts, args.batch_sizes, args.max_tokens, sampling,
                               per_batch, tuple(args.batch_sizes) if args.profile else (), env=env)
        except Exception as e:  # noqa: BLE001
            print(f"[{name}] failed: {e}", file=sys.stderr)
            rows.append({"config": name, "error": str(e)[-1500:]})
            continue
        for b, p in res.get("profiles", {}).items():
            profiles[f"{name}/bs{b}"] = p
            if not p["steps"]:  # vLLM's V2 runner: no step regions to count steps by
                print(f"{name:>18} bs={b:>3} profiled: {p['wall_ms']:.1f} ms wall, device "
                      f"{p['device_ms']:.1f} ms in all (steps not countable)")
                continue
            print(f"{name:>18} bs={b:>3} profiled: {p['wall_ms_per_step']:.2f} ms/step wall, "
                  f"device {p['device_ms_per_step']:.2f} ms/step, regions "
                  + ", ".join(f"{k.split(': ')[1]} {v['host_ms_per_step']:.2f}"
                              for k, v in p["regions"].items()))
        for r in res["rows"]:
            tau = r["tau"] or 1.0
            per_req = r["output_tokens"] / r["requests"]
            rounds = r["requests"] / r["batch_size"]
            ms = 1000 * r["seconds"] / rounds / (per_req / tau)
            rows.append({"config": name, "batch_size": r["batch_size"], "ms_per_step": ms,
                         "tau": r["tau"], "tokens_per_s": r["tokens_per_s"],
                         "engine_start_s": res["engine_start_s"]})
            print(f"{name:>18} bs={r['batch_size']:>3} {ms:7.2f} ms/step tau={tau:.2f}")

    summary = summarize(rows)
    if profiles:
        out.with_suffix(".profile.txt").write_text(
            "".join(f"===== {k}\n{p.pop('table')}\n" for k, p in profiles.items()))
        rows.append({"profiles": profiles})
    write_envelope(out, "step_cost", vars(args), rows, summary)
    print("summary:", summary)


if __name__ == "__main__":
    main()
