"""One engine step from a Chrome trace of medusa_vllm.profiling (MEDUSA_VLLM_PROFILE_TRACE):
where the host spends the step, region by region, and how long the GPU is busy in it.

    python tools/gpu/trace_timeline.py TRACE.json.gz [TRACE ...] [--labels NAME ...] [--step 6]
        [--device "NVIDIA H100 80GB HBM3"] [--out FILE.json]

A step runs from one "gpu_model_runner: forward" to the next. For each region (vLLM's
"gpu_model_runner: …", "schedule: …" and medusa_vllm's "medusa: …" ranges) it gives the start
(relative to the forward) and the host duration; for the larger regions the torch ops and CUDA
runtime calls inside, and how much of the region no op covers (Python between ops). Profiled
times are inflated by the profiler; compare parts with each other. ``--out`` writes the
results envelope (rows: the timelines; summary: per label, the step, GPU-busy and main region
times); ``--device`` names the machine the traces came from."""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.report import envelope, write_json  # noqa: E402

# the regions the summary adds up per step (host µs)
SUMMARY_REGIONS = {
    "vllm_preprocess_us_incl_plan": "gpu_model_runner: preprocess",
    "medusa_plan_us": "medusa: plan",
    "medusa_verify_heads_us": "medusa: verify+heads",
    "forward_launch_us": "gpu_model_runner: forward",
    "bookkeep_us": "gpu_model_runner: bookkeep",
    "scheduler_allocate_slots_us": "schedule: allocate_slots",
}


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


def summarize(timeline: dict) -> dict:
    host = {k: sum(r["host_us"] for r in timeline["regions"] if r["name"] == name)
            for k, name in SUMMARY_REGIONS.items()}
    return {"step_us": timeline["step_us"], "gpu_busy_us": timeline["gpu_busy_us"], **host}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--labels", nargs="+", default=None, help="one per trace (default: file names)")
    ap.add_argument("--step", type=int, default=6)
    ap.add_argument("--device", default=None, help="the machine the traces came from")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    labels = args.labels or [Path(t).name for t in args.traces]
    if len(labels) != len(args.traces):
        ap.error(f"--labels: {len(labels)} given for {len(args.traces)} traces; give one per trace")
    rows = [{"label": label, **step_timeline(t, args.step)} for label, t in zip(labels, args.traces)]
    for s in rows:
        print(f"{s['label']} ({s['trace']}): step {s['step_us']} us, GPU busy {s['gpu_busy_us']} us")
        for r in s["regions"]:
            extra = f"  (no op: {r['uncovered_us']} us)" if "uncovered_us" in r else ""
            print(f"  {r['start_us']:>7} {r['host_us']:>6}  {r['name']}{extra}")
    if args.out:
        summary = {s["label"]: summarize(s) for s in rows} | {"device": args.device}
        write_json(args.out, envelope("step_timeline", device=args.device, config=vars(args), rows=rows,
                                      summary=summary))


if __name__ == "__main__":
    main()
