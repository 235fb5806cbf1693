"""Greedy equivalence of medusa_vllm with vLLM without speculation, by batch size.

    python benchmarks/equivalence.py [--num-prompts 32] [--max-tokens 48] [--tree sparse-15]

Runs the same chat prompts (MT-Bench first turns) through vLLM without speculation and with
medusa_vllm (bundled model and heads unless given), in groups of 1, 4 and 16 concurrent requests,
and counts token-identical outputs. On CPU it runs fp32 (multi-token verification queries and
single-token decode then agree to rounding); writes benchmarks/results/vllm_<dev>_equivalence.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_tag, metric_values, run_isolated, write_envelope  # noqa: E402


def generate(kw: dict, groups: list[list[str]], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = [[list(o.outputs[0].token_ids) for o in llm.generate(g, sp, use_tqdm=False)] for g in groups]
    return {"outputs": outs, "metrics": metric_values(llm)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", default="medusa_vllm")
    ap.add_argument("--tree", default="sparse-15")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from medusa_vllm.bundled import bundled_model_path
    from medusa_vllm.prompts import chat, mt_bench_questions

    model = args.model or str(bundled_model_path())
    prompts = chat(AutoTokenizer.from_pretrained(model), mt_bench_questions()[: args.num_prompts])
    # every prompt runs once per batch size: groups of b concurrent requests
    groups, sizes = [], []
    for b in args.batch_sizes:
        for i in range(0, len(prompts), b):
            groups.append(prompts[i : i + b])
            sizes.append(b)
    gpu = torch.cuda.is_available()
    kw = dict(model=model, max_model_len=2048, max_num_seqs=max(args.batch_sizes), seed=0,
              disable_log_stats=False, max_num_batched_tokens=2048,
              **(dict(dtype="bfloat16", gpu_memory_utilization=0.3) if gpu else
                 dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2)))
    base = run_isolated(generate, dict(kw, **({"attention_backend": "TRITON_ATTN"} if gpu else {})),
                        groups, args.max_tokens)
    spec = {"method": "medusa_vllm", "model": args.heads, "tree": args.tree}
    med = run_isolated(generate, dict(kw, speculative_config=spec), groups, args.max_tokens)
    rows = []
    for b in args.batch_sizes:
        pairs = [(x, y) for s, gb, gm in zip(sizes, base["outputs"], med["outputs"]) if s == b
                 for x, y in zip(gb, gm)]
        rows.append({"batch_size": b, "prompts": len(pairs),
                     "identical_outputs": sum(x == y for x, y in pairs)})
        print(f"batch {b:>3}: {rows[-1]['identical_outputs']}/{len(pairs)} identical")
    m = med["metrics"]
    drafts = m.get("vllm:spec_decode_num_drafts", 0)
    tau = 1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) / drafts if drafts else None
    summary = {
        "prompts": args.num_prompts,
        "identical_outputs": sum(r["identical_outputs"] for r in rows),
        "compared_outputs": sum(r["prompts"] for r in rows),
        "mean_accepted_length": tau,
        "heads": "trained (bundled, medusa_vllm/data/heads)" if args.heads == "medusa_vllm" else args.heads,
        "batch_sizes": args.batch_sizes,
        "dtype": kw["dtype"],
    }
    out = Path(args.out) if args.out else RESULTS / f"vllm_{device_tag()}_equivalence.json"
    write_envelope(out, "vllm_equivalence", vars(args) | {"tree": args.tree}, rows, summary)
    print("summary:", summary, "->", out)


if __name__ == "__main__":
    main()
