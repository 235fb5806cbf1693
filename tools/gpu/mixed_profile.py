"""Where the host time of a step with a new request goes: one engine (as benchmarks/throughput.py
builds it) runs a ``--steady K`` round (K x b requests, at most b at a time: a finished request's
slot refilled at once, so many steps carry a new request's prefill beside the tree decodes) and a
closed round (b requests, all prefilled together), each under the torch profiler
(:mod:`medusa_vllm.profiling`); per round: the step regions' host ms per step, the CUDA runtime
calls per step (syncs and allocations too) and the profiler's table by self CPU time.

Usage: python tools/gpu/mixed_profile.py --model M --heads H --config medusa-v2:default-63 \\
           --batch-size 32 --steady 2 --out mixed_profile.json"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def run(kw: dict, prompts: list[str], b: int, steady: int, max_tokens: int, sampling: dict) -> dict:
    from benchmarks.throughput import EngineBench, requests_for, round_size
    from medusa_vllm.profiling import start_profile, stop_profile

    bench = EngineBench(kw, prompts, max_tokens, sampling)
    bench.warmup([b], 1, steady)
    llm = bench.llm
    out = {}
    for name, size in (("steady", round_size(b, steady)), ("closed", b)):
        llm.collective_rpc(start_profile)
        s = time.perf_counter()
        bench._decode(requests_for(prompts, size), b)
        wall = time.perf_counter() - s
        out[name] = llm.collective_rpc(stop_profile, args=(30,))[0] | {"round_s": wall, "requests": size}
    return out


def parser() -> argparse.ArgumentParser:
    from benchmarks.throughput import add_tool_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--config", default="medusa-v2:default-63")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steady", type=int, default=2, metavar="K")
    ap.add_argument("--max-tokens", type=int, default=128)
    add_tool_arguments(ap)
    ap.add_argument("--out", required=True)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.steady < 2:
        sys.exit(f"--steady {args.steady}: give K >= 2 (K x b requests, at most b at a time)")
    import torch

    from benchmarks.common import run_isolated, write_envelope
    from benchmarks.throughput import engine_for, prompts_for, sampling_of, tool_args

    targs = tool_args(args.model, [args.batch_size], args.temperature, args.attention)
    prompts = prompts_for(targs)
    kw, env = engine_for(targs, args.config, args.heads, None, torch.cuda.is_available())
    res = run_isolated(run, kw, prompts, args.batch_size, args.steady, args.max_tokens, sampling_of(targs),
                       env=env | {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_CUSTOM_SCOPES_FOR_PROFILING": "1"})
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for name, r in res.items():
        print(f"== {args.config} bs={args.batch_size} {name}: {r['requests']} requests, {r['round_s']:.2f} s, "
              f"{r['steps']} steps, {f(r['wall_ms_per_step'], '.2f')} ms/step (profiled)")
        for k, v in r["regions"].items():
            print(f"   {k:<48} {f(v['host_ms_per_step'])} host ms/step  {f(v['calls_per_step'], '.2f')} calls/step")
        print(f"   runtime calls/step: {r['runtime_calls_per_step']}")
        print(r["table"])
    from training.report import device_name

    rows = [{"config": args.config, "batch_size": args.batch_size, "round": name}
            | {k: v for k, v in r.items() if k != "table"} for name, r in res.items()]
    write_envelope(Path(args.out), "mixed_profile", vars(args),
                   rows, {"device": device_name(), "tables": {n: r["table"] for n, r in res.items()}})


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    main()
