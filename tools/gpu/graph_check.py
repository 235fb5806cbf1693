"""GPU check of the FULL-graph tree step: one medusa_vllm engine with vLLM's default graphs
(FULL for uniform tree steps) and MEDUSA_VLLM_GRAPH_CHECK=N, so its first N FULL tree steps
also run eagerly on the same inputs and log the largest hidden-state difference.
Usage: python tools/gpu/graph_check.py MODEL HEADS TREE [N]"""
import os
import sys

if __name__ == "__main__":
    model, heads, tree = sys.argv[1:4]
    os.environ["MEDUSA_VLLM_GRAPH_CHECK"] = sys.argv[4] if len(sys.argv) > 4 else "8"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from medusa_vllm.prompts import chat

    prompts = chat(AutoTokenizer.from_pretrained(model),
                   ["What is the capital of France?", "Write a haiku about the sea."])
    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.25,
              seed=0, max_num_seqs=4, max_num_batched_tokens=1024,
              speculative_config={"method": "medusa_vllm", "model": heads, "tree": tree})
    for p in prompts:  # batch 1, then both at once
        print(llm.generate([p], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    print("graph_check done", flush=True)
    os._exit(0)  # the engine's shutdown hung past the time limit in both runs of 2026-11-23
