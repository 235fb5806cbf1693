"""GPU check of sampled uniform steps: one medusa_vllm engine (bf16, CUDA graphs, asynchronous
scheduling, MEDUSA_VLLM_SYNC_DEBUG=1 so a host sync inside medusa_vllm's part of a step raises)
decodes sampled requests (temperature 0.8, top-p 0.95; seeded) at several batch sizes, greedy
and sampled side by side, and with min-p; prints how many uniform sampled steps replayed a
CUDA graph (``medusa_stats()["uniform_sampled"]``), the step paths, τ, and whether each seeded
request gave the same tokens twice (a replay is a function of its inputs and the seeded rows'
random numbers come from the request's own key: its seed and computed-token count on the V2
runner, its own generator on V1).

Usage: python tools/gpu/sampled_check.py MODEL HEADS [TREE]"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import metric_values, run_isolated  # noqa: E402


def run(kw, prompts):
    from vllm import LLM, SamplingParams

    t = time.time()
    llm = LLM(**kw)
    start = time.time() - t
    sampled = dict(temperature=0.8, top_p=0.95, max_tokens=64)
    jobs = {
        "bs1": [prompts[0]],
        "bs4": prompts[:4],
        "bs8": prompts[:8],
        "bs16": prompts[:16],
    }
    out, seconds = {}, {}
    for name, ps in jobs.items():
        params = [SamplingParams(seed=100 + i, **sampled) for i in range(len(ps))]
        t = time.time()
        first = llm.generate(ps, params, use_tqdm=False)
        seconds[name] = time.time() - t
        again = llm.generate(ps, params, use_tqdm=False)
        out[name] = {
            "tokens": sum(len(o.outputs[0].token_ids) for o in first),
            "seeded_repeat_identical": sum(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
                                           for a, b in zip(first, again)),
            "of": len(ps),
        }
    # greedy and sampled side by side; min-p
    mixed = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, seed=i, max_tokens=48) for i in range(8)]
    llm.generate(prompts[:8], mixed, use_tqdm=False)
    min_p = [SamplingParams(temperature=1.0, min_p=0.1, seed=i, max_tokens=48) for i in range(8)]
    llm.generate(prompts[:8], min_p, use_tqdm=False)
    stats = llm.collective_rpc("medusa_stats")[0]
    return {"start_s": start, "seconds": seconds, "jobs": out, "metrics": metric_values(llm), "stats": stats}


if __name__ == "__main__":
    model, heads = sys.argv[1:3]
    tree = sys.argv[3] if len(sys.argv) > 3 else "default-63"
    from transformers import AutoTokenizer

    from medusa_vllm.prompts import chat

    qs = ["What is the capital of France?", "Write a haiku about the sea.",
          "Explain recursion to a child.", "List three prime numbers and why they are prime."] * 4
    prompts = chat(AutoTokenizer.from_pretrained(model), qs)
    kw = dict(model=model, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3,
              seed=0, disable_log_stats=False, max_num_seqs=16, max_num_batched_tokens=2048,
              async_scheduling=True,
              speculative_config={"method": "medusa_vllm", "model": heads, "tree": tree})
    res = run_isolated(run, kw, prompts, env={"MEDUSA_VLLM_SYNC_DEBUG": "1"})
    m = res["metrics"]
    d = m.get("vllm:spec_decode_num_drafts", 0)
    st = res["stats"]
    print(json.dumps({
        "tau": 1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) / d if d else None,
        "start_s": res["start_s"], "seconds": res["seconds"], "jobs": res["jobs"],
        "uniform_sampled": {k: v for k, v in st["uniform_sampled"].items() if k != "by_tree"},
        "uniform_sampled_by_tree": st["uniform_sampled"]["by_tree"],
        "uniform_greedy": {k: v for k, v in st["uniform_greedy"].items() if k != "by_tree"},
        "step_paths": st["step_paths"], "mean_accepted_length": st["mean_accepted_length"],
    }, indent=1))
