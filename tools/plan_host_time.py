"""Host time of a tree step's input preparation, with and without the per-batch-size plan cache
for the load-adaptive tree's smaller trees.

    python tools/plan_host_time.py [--batch-sizes 1 8] [--repeats 2] [--out X.json]

An adaptive engine with the budget rule (tokens per step = batch size x 8: the 7-node tree at
each measured batch size) runs greedy rounds of 64 tokens; the runner's ``_prepare_inputs``
(vLLM's input preparation plus medusa_vllm's plan: what the cache shortens) is timed per step.
``cached`` is the engine as it ships (every tree size's uniform steps from the cache);
``largest-only`` keeps only the largest tree's cache (the earlier behaviour), so 7-node steps
build their plan from the batch and vLLM makes its spec-decode index tensors anew. Each engine
runs in its own process (in-process engine core, so the runner can be reached), the two modes
alternating; the median step of each run is reported. The engine uses the test suite's settings
(tests/vllm_engine.py: fp32, eager), made for the CPU; there the host-to-device copies the cache
saves are plain memory copies, so it measures the Python and NumPy part of the saving.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_isolated, write_envelope  # noqa: E402

PROMPTS = ["Tell me about the history of Rome.", "Write a poem about the sea.", "Explain quicksort.",
           "What is a prime number?", "List five fruits.", "Describe a cat.", "How do planes fly?",
           "What is Python?"]
MODES = ("cached", "largest-only")


def measure(mode: str, batch_size: int, model: str | None, max_tokens: int, rounds: int) -> dict:
    from vllm import LLM, SamplingParams

    from medusa_vllm.bundled import bundled_model_path
    from tests.vllm_engine import CPU_ENGINE

    spec = {"method": "medusa_vllm", "model": "medusa_vllm", "tree": "sparse-15", "adaptive": True,
            "adaptive_policy": "budget", "adaptive_max_tokens": 8 * batch_size}
    llm = LLM(**dict(CPU_ENGINE, model=model or str(bundled_model_path()), speculative_config=spec))
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    if mode == "largest-only":
        q = max(runner._medusa_uniform)
        runner._medusa_uniform = {q: runner._medusa_uniform[q]}
    seconds: list[float] = []
    prepare = runner._prepare_inputs

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = prepare(*args, **kwargs)
        seconds.append(time.perf_counter() - t)
        return out

    runner._prepare_inputs = timed
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up
    seconds.clear()
    for _ in range(rounds):
        llm.generate(prompts, sp, use_tqdm=False)
    paths = llm.collective_rpc("medusa_stats")[0]["step_paths"]
    return {"mode": mode, "batch_size": batch_size, "steps": len(seconds),
            "prepare_inputs_us_median": round(1e6 * statistics.median(seconds), 1),
            "prepare_inputs_us_p90": round(1e6 * sorted(seconds)[int(0.9 * (len(seconds) - 1))], 1),
            "step_paths": paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    rows = []
    for b in args.batch_sizes:
        for r in range(args.repeats):
            for mode in MODES:
                row = run_isolated(measure, mode, b, args.model, args.max_tokens, args.rounds, env=env)
                rows.append(dict(row, repeat=r))
                print(f"bs {b:3d} {mode:13s} repeat {r}: {row['prepare_inputs_us_median']:8.1f} us "
                      f"median over {row['steps']} steps  {row['step_paths']}")
    summary = {}
    for b in args.batch_sizes:
        med = {m: statistics.median(x["prepare_inputs_us_median"] for x in rows
                                    if x["batch_size"] == b and x["mode"] == m) for m in MODES}
        summary[f"bs{b}"] = {**{f"{m}_us": v for m, v in med.items()},
                             "saved_us": round(med["largest-only"] - med["cached"], 1)}
    print(summary)
    if args.out:
        print("wrote", write_envelope(Path(args.out), "plan_host_time", vars(args), rows, summary))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    main()
