"""One engine step from a Chrome trace of medusa_vllm.profiling (MEDUSA_VLLM_PROFILE_TRACE):
where the host spends the step, region by region, and how long the GPU is busy in it.

    python tools/gpu/trace_timeline.py TRACE.json.gz [TRACE ...] [--step 6] [--out FILE.json]

A step runs from one "gpu_model_runner: forward" to the next. For each region (vLLM's
"gpu_model_runner: …", "schedule: …" and medusa_vllm's "medusa: …" ranges) it gives the start
(relative to the forward) and the host duration; for the larger regions the torch ops and CUDA
runtime calls inside, and how much of the region no op covers (Python between ops). Profiled
times are inflated by the profiler; compare parts with each other."""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def _tops(events, parent):
    """Outermost ops / runtime calls inside `parent` on its thread."""
    a, b = parent["ts"], parent["ts"] + parent["dur"]
    inner = sorted((e for e in events if e is not parent and e.get("tid") == parent.get("tid")
                    and a <= e["ts"] < b and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime")),
                   key=lambda e: (e["ts"], -e["dur"]))
    tops, end = [], -1.0
    for e in inner:
        if e["ts"] >= end:
            tops.append(e)
            end = e["ts"] + e["dur"]
    return tops


def step_timeline(path: str, step: int = 6, detail_us: float = 200.0) -> dict:
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    fwd = sorted((e for e in events if e["name"] == "gpu_model_runner: forward"
                  and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    if len(fwd) < step + 2:
        raise SystemExit(f"{path}: {len(fwd)} forwards, need at least {step + 2}")
    t0, t1 = fwd[step]["ts"], fwd[step + 1]["ts"]
    regions = []
    for e in sorted((e for e in events if e.get("cat") == "user_annotation" and t0 <= e["ts"] < t1),
                    key=lambda e: e["ts"]):
        r = {"name": e["name"], "start_us": round(e["ts"] - t0), "host_us": round(e["dur"])}
        if e["dur"] >= detail_us:
            tops = _tops(events, e)
            r["uncovered_us"] = round(e["dur"] - sum(x["dur"] for x in tops))
            r["largest_inside"] = [{"name": x["name"][:80], "start_us": round(x["ts"] - e["ts"]),
                                    "us": round(x["dur"])} for x in sorted(tops, key=lambda x: -x["dur"])[:8]]
        regions.append(r)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and t0 <= e["ts"] < t1]
    return {
        "trace": Path(path).name, "step": step, "step_us": round(t1 - t0),
        "gpu_busy_us": round(sum(e["dur"] for e in gpu)), "gpu_ops": len(gpu),
        "regions": regions,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--step", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = [step_timeline(t, args.step) for t in args.traces]
    for s in out:
        print(f"{s['trace']}: step {s['step_us']} us, GPU busy {s['gpu_busy_us']} us")
        for r in s["regions"]:
            extra = f"  (no op: {r['uncovered_us']} us)" if "uncovered_us" in r else ""
            print(f"  {r['start_us']:>7} {r['host_us']:>6}  {r['name']}{extra}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
