"""GPU smoke test of the plugin: greedy outputs with and without Medusa on the same engine
settings (bf16, CUDA graphs), plus τ, with 2 logprobs per token (compared where the tokens
agree: the emitted token's logprob and the top-2 ids), and again with every other request
unable to speculate (min_tokens); then sampled requests on the Medusa engine, whether the
seeded ones repeat their tokens in the same batch and in the batch reversed. The Medusa engine runs with MEDUSA_VLLM_SYNC_DEBUG=1: a host sync
inside medusa_vllm's part of a step raises. Usage: python tools/gpu/plugin_smoke.py MODEL HEADS TREE
[SPEC_JSON] (more speculative-config keys, e.g. '{"runner":"v2"}'; "async_scheduling" and
"enforce_eager" in it are engine arguments of the Medusa engine)"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import metric_values, run_isolated  # noqa: E402


def run(kw, prompts, n):
    from vllm import LLM, SamplingParams

    t = time.time()
    llm = LLM(**kw)
    start = time.time() - t
    t = time.time()
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, logprobs=2), use_tqdm=False)
    gen = time.time() - t
    res = {"start_s": start, "gen_s": gen, "metrics": metric_values(llm),
           "tokens": [list(o.outputs[0].token_ids) for o in out], "text0": out[0].outputs[0].text,
           # per request, per position: (the emitted token's logprob, the top-2 ids by rank)
           "logprobs": [[(lp[t].logprob, sorted((k for k in lp if lp[k].rank <= 2), key=lambda k: lp[k].rank))
                         for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in out]}
    if kw.get("speculative_config"):
        # sampled requests in the same engine (after the greedy numbers): seeded ones must
        # repeat their tokens, whatever the batch around them
        sampled = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=n, seed=(i if i % 2 else None))
                   for i in range(len(prompts))]
        first = llm.generate(prompts, sampled, use_tqdm=False)
        same = llm.generate(prompts, sampled, use_tqdm=False)
        reversed_ = llm.generate(prompts[::-1], sampled[::-1], use_tqdm=False)[::-1]
        # per seeded request: its tokens again in the same batch, and in the batch reversed
        # (vLLM 0.26 itself repeats neither on the CPU: tested there without speculation)
        res["sampled_seeded_repeat"] = {
            name: [list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
                   for i, (a, b) in enumerate(zip(first, other)) if i % 2]
            for name, other in (("same_order", same), ("reversed", reversed_))}
        # greedy again with every other request unable to speculate (min_tokens: the V2 runner
        # rejects that request's drafts and takes vLLM's token, the others keep theirs)
        mixed = [SamplingParams(temperature=0, max_tokens=n, min_tokens=(2 if i % 2 else 0))
                 for i in range(len(prompts))]
        res["tokens_mixed_nospec"] = [list(o.outputs[0].token_ids)
                                      for o in llm.generate(prompts, mixed, use_tqdm=False)]
        res["medusa_stats"] = llm.collective_rpc("medusa_stats")[0]
    return res


if __name__ == "__main__":
    model, heads, tree = sys.argv[1:4]
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    # engine arguments among them (the rest is speculative config)
    engine = {k: extra.pop(k) for k in ("async_scheduling", "enforce_eager") if k in extra}
    from transformers import AutoTokenizer

    from medusa_vllm.prompts import chat

    qs = ["What is the capital of France?", "Write a haiku about the sea.",
          "Explain recursion to a child.", "List three prime numbers and why they are prime."] * 4
    prompts = chat(AutoTokenizer.from_pretrained(model), qs)
    kw = dict(model=model, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.25,
              seed=0, disable_log_stats=False, max_num_seqs=16, max_num_batched_tokens=2048)
    base = run_isolated(run, dict(kw, attention_backend="TRITON_ATTN"), prompts, 48)
    med = run_isolated(run, dict(kw, **engine,
                                 speculative_config={"method": "medusa_vllm", "model": heads,
                                                     "tree": tree, **extra}), prompts, 48,
                       env={"MEDUSA_VLLM_SYNC_DEBUG": "1"})
    m = med["metrics"]
    d = m.get("vllm:spec_decode_num_drafts", 0)
    same = sum(a == b for a, b in zip(base["tokens"], med["tokens"]))
    # logprobs where both engines emitted the same tokens so far (the common prefix)
    diffs, top_same, n_pos = [], 0, 0
    for ta, tb, la, lb in zip(base["tokens"], med["tokens"], base["logprobs"], med["logprobs"]):
        for x, y, (pa, ka), (pb, kb) in zip(ta, tb, la, lb):
            if x != y:
                break
            diffs.append(abs(pa - pb))
            top_same += ka == kb
            n_pos += 1
    print(json.dumps({"identical": same, "of": len(prompts), "tau": 1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) / d if d else None,
                      "base_gen_s": base["gen_s"], "med_gen_s": med["gen_s"], "base_start_s": base["start_s"],
                      "med_start_s": med["start_s"], "base_text": base["text0"][:120], "med_text": med["text0"][:120],
                      "logprobs_positions": n_pos, "logprob_max_abs_diff": max(diffs, default=None),
                      "logprob_mean_abs_diff": sum(diffs) / n_pos if n_pos else None,
                      "top2_ids_same": top_same,
                      # the same greedy requests, every other one with min_tokens (cannot speculate)
                      "identical_mixed_nospec": sum(a == b for a, b in zip(base["tokens"], med["tokens_mixed_nospec"])),
                      "sampled_seeded_repeat": med["sampled_seeded_repeat"],
                      "medusa_stats": med["medusa_stats"]}, indent=1))
