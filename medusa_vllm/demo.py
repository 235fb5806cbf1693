"""``python -m medusa_vllm.demo``: Medusa tree decoding in vLLM on the bundled model and heads.

Generates greedy answers to a few MT-Bench questions with and without Medusa (same engine
settings), checks the answers are identical, and prints tokens/s, the speed-up and τ (mean tokens
per verification step). Runs on whatever device vLLM finds (CPU here, CUDA on a GPU machine).
"""

from __future__ import annotations

import argparse
import os
import time


def _engine_kwargs(model: str, device_is_cpu: bool) -> dict:
    kw = dict(model=model, max_model_len=2048, seed=0, disable_log_stats=False)
    if device_is_cpu:
        kw.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                  max_num_batched_tokens=2048)
    else:
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.3)
    return kw


def _run(kw: dict, prompts: list[str], max_tokens: int):
    from vllm import LLM, SamplingParams

    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    text = outs[0].outputs[0].text
    del llm
    return tokens, sum(map(len, tokens)) / elapsed, metrics, text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2-135M)")
    ap.add_argument("--heads", default=None, help="Medusa heads (default: next to the model / bundled)")
    ap.add_argument("--tree", default=None, help="tree preset or JSON list of paths")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    from medusa_vllm.bundled import bundled_model_path
    from medusa_vllm.prompts import chat, mt_bench_questions

    model = args.model or str(bundled_model_path())
    tok = AutoTokenizer.from_pretrained(model)
    prompts = chat(tok, mt_bench_questions()[: args.num_prompts])
    cpu = current_platform.is_cpu()
    kw = _engine_kwargs(model, cpu)
    spec = {"method": "medusa_vllm", "model": args.heads or "medusa_vllm"}
    if args.tree:
        spec["tree"] = args.tree
    elif cpu:
        spec["tree"] = "sparse-15"  # a 2-core CPU is compute-bound past ~16 tokens a step

    base_tokens, base_tps, _, _ = _run(kw, prompts, args.max_tokens)
    med_tokens, med_tps, metrics, text = _run(dict(kw, speculative_config=spec), prompts, args.max_tokens)
    drafts = metrics.get("vllm:spec_decode_num_drafts") or 0
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens") or 0
    tau = 1 + accepted / drafts if drafts else float("nan")
    same = sum(a == b for a, b in zip(base_tokens, med_tokens))
    print("\n=== medusa_vllm demo ===")
    print(f"model: {model}   device: {'cpu' if cpu else current_platform.get_device_name()}")
    print(f"prompts: {len(prompts)} MT-Bench questions, {args.max_tokens} tokens each, greedy")
    print(f"vLLM, no speculation : {base_tps:8.1f} tokens/s")
    print(f"vLLM + medusa_vllm   : {med_tps:8.1f} tokens/s   ({med_tps / base_tps:.2f}x)")
    print(f"tau (tokens per verification step): {tau:.2f}")
    print(f"greedy outputs identical: {same}/{len(prompts)}")
    print(f"\nQ: {mt_bench_questions()[0][:100]}...\nA: {text[:300]}")


if __name__ == "__main__":
    main()
