"""Where a tree_attention CTA spends its time: phase timestamps (clock64, thread 0 of each CTA)
from a trace build of the CUDA kernel (csrc/tree_attention_cuda.cuh's MEDUSA_TRACE points).

    python tools/gpu/kernel_trace.py build            # here (nvcc): build/kernel_trace/medusa_trace.so
    python tools/gpu/kernel_trace.py run --out DIR    # on the GPU, with that .so carried

Phases (cycles, median over the CTAs that compute): decode (CTA work from the metadata), issue
(Q and the first KV copies), mask (mask rows to shared memory), then per KV tile: wait (its
copies), sync (the barrier), compute (next tile's copies issued, S, softmax, PV), and store.
Also the CTAs' start spread and the kernel's span (globaltimer, ns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
HERE = os.path.join(REPO, "tools", "gpu", "kernel_trace")
SO = os.path.join(REPO, "build", "kernel_trace", "medusa_trace.so")


def build() -> None:
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # as setup.py finds it
    os.makedirs(os.path.dirname(SO), exist_ok=True)
    load(name="medusa_trace", sources=[os.path.join(HERE, "trace_ext.cu")],
         extra_include_paths=[os.path.join(REPO, "csrc"), HERE],
         extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DMEDUSA_VLLM_WITH_CUDA",
                            "-gencode=arch=compute_90a,code=sm_90a"],
         extra_ldflags=["-L/usr/local/cuda/lib"], build_directory=os.path.dirname(SO),
         is_python_module=False, verbose=True)
    print("built", SO)


def phases(trace: torch.Tensor, tiles: int) -> dict:
    t = trace[trace[:, 28] != 0]  # CTAs that computed
    if t.shape[0] == 0:
        return {}
    col = lambda a, b: statistics.median((t[:, b] - t[:, a]).tolist())  # noqa: E731
    out = {"ctas": int(t.shape[0]), "decode": col(0, 1), "issue": col(1, 2), "mask": col(2, 3)}
    prev = 3
    for j in range(min(tiles, 8)):
        have = t[:, 6 + 3 * j] != 0
        if not bool(have.any()):
            break
        tj = t[have]
        out[f"t{j}_wait"] = statistics.median((tj[:, 4 + 3 * j] - tj[:, prev]).tolist())
        out[f"t{j}_sync"] = statistics.median((tj[:, 5 + 3 * j] - tj[:, 4 + 3 * j]).tolist())
        out[f"t{j}_compute"] = statistics.median((tj[:, 6 + 3 * j] - tj[:, 5 + 3 * j]).tolist())
        prev = 6 + 3 * j
    last = torch.stack([row[6 + 3 * max(k for k in range(8) if row[6 + 3 * k] != 0)] for row in t])
    out["store"] = statistics.median((t[:, 28] - last).tolist())
    out["total_cycles"] = statistics.median((t[:, 28] - t[:, 0]).tolist())
    started = trace[trace[:, 29] != 0]
    t0 = int(started[:, 29].min())
    out["start_spread_ns"] = int(started[:, 29].max()) - t0
    out["span_ns"] = int(t[:, 30].max()) - t0
    return out


def result(rows: list[dict], clock_khz) -> dict:
    """The results envelope (shared/RESULTS.md) around the trace rows."""
    from training.report import envelope

    summary = {f"b{r['batch']}_ctx{r['context']}_q{r['q_len']}_splits{r['splits']}_total_cycles":
               statistics.median(run["total_cycles"] for run in r["runs"] if run) for r in rows}
    config = {"shape": "9 q / 3 kv heads, head dim 64, block size 16, block table 128 wide, bf16",
              "phases": "clock64 of thread 0 per CTA; median over the CTAs that compute; 5 calls",
              "clock_khz": clock_khz}
    return envelope("kernel_trace", device=torch.cuda.get_device_name(), config=config, rows=rows, summary=summary)


def run(args) -> None:
    sys.path.insert(0, os.path.join(REPO, "benchmarks", "kernels"))
    from tree_attention_latency import make_problem

    torch.ops.load_library(args.so)
    clock_khz = torch.cuda.get_device_properties(0).clock_rate if hasattr(
        torch.cuda.get_device_properties(0), "clock_rate") else None
    rows = []
    for batch, context, q_len, splits in [(1, 256, 64, 0), (1, 256, 64, 1), (1, 1024, 64, 1), (1, 1024, 64, 0),
                                          (8, 256, 64, 0), (32, 256, 64, 0), (32, 1024, 64, 0), (1, 256, 16, 1)]:
        p = make_problem(batch, context, q_len)  # SmolLM2-135M's shape, a 2,048-token block table
        op = lambda: torch.ops.medusa_trace.tree_attention(p.out, *p.args()[1:], p.scale, 0.0, splits)  # noqa: E731
        for _ in range(3):
            op()
        results = []
        for _ in range(5):
            torch.ops.medusa_trace.clear_trace()
            op()
            results.append(phases(torch.ops.medusa_trace.read_trace(), (context + q_len + 63) // 64))
        expected = p.out.clone()
        from medusa_vllm.kernels import tree_attention_ref

        tree_attention_ref(expected, *p.args()[1:], p.scale)
        err = (p.out.float() - expected.float()).abs().max().item()
        row = {"batch": batch, "context": context, "q_len": q_len, "splits": splits or "auto", "max_abs_err": err,
               "runs": results}
        rows.append(row)
        mid = results[len(results) // 2]
        print(f"B={batch} ctx={context} q={q_len} splits={splits or 'auto'} err={err:.3g}")
        print("   " + " ".join(f"{k}={v}" for k, v in mid.items()), flush=True)
    out = result(rows, clock_khz)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_trace.json"), "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["build", "run"])
    ap.add_argument("--so", default=SO)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    build() if args.mode == "build" else run(args)


if __name__ == "__main__":
    main()
