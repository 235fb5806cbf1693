"""Greedy equivalence of medusa_vllm with vLLM without speculation, by batch size.

    python benchmarks/equivalence.py [--num-prompts 32] [--max-tokens 48] [--tree sparse-15]
                                     [--variants default piecewise eager]

Runs the same chat prompts (MT-Bench first turns) through vLLM without speculation and with
medusa_vllm (bundled model and heads unless given), in groups of 1, 4 and 16 concurrent requests,
and counts token-identical outputs. On CPU it runs fp32 by default (multi-token verification
queries and single-token decode then agree to rounding); on GPU bf16 (the CUDA kernel's dtypes).

For each output that differs, the engine without speculation is asked again at the first token
where the two differ (prompt + common prefix, top-20 log-probabilities): ``margin`` is how much more
likely its own token is than Medusa's there. A margin within the logits' bf16 spacing (1/16-1/8
at typical logit sizes) is a near-tie that rounding decides — any different attention kernel flips
such tokens; a large margin, or Medusa's token far down the list, points at a bug.
``--variants`` runs the medusa_vllm engine in several execution modes against the one engine
without speculation: ``default`` (vLLM's default graphs: FULL for uniform tree steps, piecewise
otherwise), ``piecewise`` (``cudagraph_mode=PIECEWISE``: attention outside the graphs) and
``eager`` (``enforce_eager``), ``eager-xformers`` (eager, xformers' tree attention). A
divergence count that moves with the mode points at graph capture/replay; one that does not, at
numerics or the step itself.
Writes benchmarks/results/vllm_<dev>_equivalence[_<dtype>].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_tag, metric_values, run_isolated, write_envelope  # noqa: E402


def generate(kw: dict, groups: list[list[str]], max_tokens: int,
             compare_to: dict[str, list[list[list[int]]]] | None = None) -> dict:
    """One engine: greedy outputs per group; with ``compare_to`` (other engines' outputs by
    name), also a probe of every first divergence from each (see the module docstring)."""
    from vllm import LLM, SamplingParams

    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = [llm.generate(g, sp, use_tqdm=False) for g in groups]
    outs = [[list(o.outputs[0].token_ids) for o in res] for res in results]
    probes = []
    for name, other in (compare_to or {}).items():
        for g, (res, others) in enumerate(zip(results, other)):
            for o, theirs in zip(res, others):
                probe = divergence_probe(llm, list(o.prompt_token_ids),
                                         list(o.outputs[0].token_ids), theirs)
                if probe is not None:
                    probes.append({"variant": name, "group": g, **probe})
    return {"outputs": outs, "metrics": metric_values(llm), "probes": probes}


def divergence_probe(llm, prompt_ids: list[int], mine: list[int], theirs: list[int]) -> dict | None:
    """Log-probabilities of both tokens at the first position where ``mine`` and ``theirs`` differ."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    if k is None:
        return None if len(mine) == len(theirs) else {"position": min(len(mine), len(theirs)),
                                                      "kind": "length"}
    out = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids + mine[:k]),
                       SamplingParams(temperature=0.0, max_tokens=1, logprobs=20), use_tqdm=False)
    top = out[0].outputs[0].logprobs[0]  # {token id: Logprob}
    ranked = sorted(top, key=lambda t: -top[t].logprob)
    lp_mine = top[mine[k]].logprob if mine[k] in top else None
    lp_theirs = top[theirs[k]].logprob if theirs[k] in top else None
    return {
        "position": k, "kind": "token", "token": mine[k], "other_token": theirs[k],
        "rank_of_other": ranked.index(theirs[k]) if theirs[k] in top else None,
        "margin": (lp_mine - lp_theirs) if lp_mine is not None and lp_theirs is not None else None,
        "probe_argmax_is": "mine" if ranked[0] == mine[k] else
                           "other" if ranked[0] == theirs[k] else "neither",
    }


VARIANTS = {
    "default": {},
    "piecewise": {"compilation_config": {"cudagraph_mode": "PIECEWISE"}},
    "eager": {"enforce_eager": True},
    # the optional xformers tree-attention backend (GPU, eager only)
    "eager-xformers": {"enforce_eager": True, "spec": {"attention": "xformers"}},
}


def summarize_probes(probes: list[dict]) -> dict:
    margins = sorted(p["margin"] for p in probes if p.get("margin") is not None)
    positions = sorted(p["position"] for p in probes)
    return {
        "divergences": len(probes),
        "divergence_margin_max": margins[-1] if margins else None,
        "divergence_margin_median": margins[len(margins) // 2] if margins else None,
        "divergences_margin_over_0.25": sum(m > 0.25 for m in margins),
        "divergence_position_median": positions[len(positions) // 2] if positions else None,
        "divergences_other_not_in_top20": sum(p.get("kind") == "token" and p["margin"] is None
                                              for p in probes),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", default="medusa_vllm")
    ap.add_argument("--tree", default="sparse-15")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS),
                    help="execution modes of the medusa_vllm engine (GPU), each against the same baseline")
    ap.add_argument("--sync-debug", action="store_true",
                    help="GPU: medusa_vllm engines run with MEDUSA_VLLM_SYNC_DEBUG=error (a host "
                         "sync in medusa_vllm's part of a step raises)")
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
    kw["dtype"] = args.dtype or kw["dtype"]
    spec = {"method": "medusa_vllm", "model": args.heads, "tree": args.tree}
    variants = args.variants if gpu else ["default"]
    env = {"MEDUSA_VLLM_SYNC_DEBUG": "error"} if args.sync_debug and gpu else None
    med, failed = {}, {}
    for v in variants:  # a variant that fails is recorded, the others still run
        try:
            extra = dict(VARIANTS[v])
            engine = dict(kw, speculative_config={**spec, **extra.pop("spec", {})}, **extra)
            med[v] = run_isolated(generate, engine, groups, args.max_tokens, env=env)
            if args.out:  # what each engine produced survives a run that is cut short
                Path(args.out).with_suffix(f".{v}.partial.json").write_text(json.dumps(med[v]))
        except Exception as exc:  # noqa: BLE001 - reported in the summary
            failed[v] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
            print(f"variant {v} failed:", failed[v])
    variants = [v for v in variants if v in med]
    if not variants:
        raise SystemExit(f"every medusa_vllm variant failed: {failed}")
    base = run_isolated(generate, dict(kw, **({"attention_backend": "TRITON_ATTN"} if gpu else {})),
                        groups, args.max_tokens, {v: m["outputs"] for v, m in med.items()})
    rows = []
    for v in variants:
        for b in args.batch_sizes:
            pairs = [(x, y) for s, gb, gm in zip(sizes, base["outputs"], med[v]["outputs"])
                     if s == b for x, y in zip(gb, gm)]
            rows.append({"variant": v, "batch_size": b, "prompts": len(pairs),
                         "identical_outputs": sum(x == y for x, y in pairs)})
            print(f"{v:>9} batch {b:>3}: {rows[-1]['identical_outputs']}/{len(pairs)} identical")
    probes = base["probes"]
    for p in probes:
        print("divergence:", p)
    per_variant = {}
    for v in variants:
        m = med[v]["metrics"]
        drafts = m.get("vllm:spec_decode_num_drafts", 0)
        vrows = [r for r in rows if r["variant"] == v]
        per_variant[v] = {
            "identical_outputs": sum(r["identical_outputs"] for r in vrows),
            "compared_outputs": sum(r["prompts"] for r in vrows),
            "mean_accepted_length":
                1 + m.get("vllm:spec_decode_num_accepted_tokens", 0) / drafts if drafts else None,
        } | summarize_probes([p for p in probes if p["variant"] == v])
    first = per_variant[variants[0]]
    summary = {
        "prompts": args.num_prompts,
        "heads": "trained (bundled, medusa_vllm/data/heads)" if args.heads == "medusa_vllm" else args.heads,
        "batch_sizes": args.batch_sizes,
        "dtype": kw["dtype"],
        **first,
        "variants": per_variant if len(variants) > 1 else None,
        "failed_variants": failed or None,
        "sync_debug": "error" if env else None,
    }
    suffix = "" if args.dtype is None else f"_{args.dtype}"
    out = Path(args.out) if args.out else RESULTS / f"vllm_{device_tag()}_equivalence{suffix}.json"
    write_envelope(out, "vllm_equivalence", vars(args) | {"tree": args.tree, "probes": probes},
                   rows, summary)
    print("summary:", summary, "->", out)


if __name__ == "__main__":
    main()
