"""Evaluate Medusa heads on the held-out split: top-1..top-k accuracy per head, the tree calibrated
from those accuracies, and tau (tokens emitted per verification step) of greedy Medusa decoding.

    python -m training.evaluate --model DIR --heads DIR --data data.jsonl [--tau-prompts 20] \
        [--write-tree] [--out eval.json]

Accuracy is teacher-forced on the held-out answers (the model's own answers for a
self-distilled set): head k at position t is right when token t+k+2 is among its top-k logits.
Tau is measured by running medusa_vllm.reference.MedusaReference (greedy) on held-out prompts
with the default tree and with the calibrated tree; `tau_estimate_*` is the product-model
estimate from the accuracies (tree.expected_accept_length), always reported next to it and
labelled as an estimate. `--write-tree` stores the calibrated tree and the accuracies in the
heads' config.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medusa_vllm.tree import (TokenTree, expected_accept_length, get_tree, per_rank_accuracies,
                              tree_from_accuracies)
from training.batching import collate, plan_sequence_batches, shard_examples
from training.dataset import Example, label_offsets
from training.distributed import DistInfo, all_reduce_, equal_calls, reshard

DEFAULT_TREE = "default-63"


@dataclass
class AccuracyReport:
    topk: list[list[float]]  # [K][k] share of targets within head k's top-(k+1)
    loss: list[float]  # [K] mean CE per head
    tokens: list[int]  # [K] targets per head
    base_top1: float  # the base lm_head's top-1 on the same answers (~1 for greedy answers)
    base_loss: float

    @property
    def top1(self) -> list[float]:
        return [row[0] for row in self.topk]


@dataclass
class TauResult:
    tree: str
    num_nodes: int
    tau: float | None  # measured with the reference engine (None when not run)
    tau_estimate: float  # product-model estimate from the accuracies
    prompts: int = 0
    step_tokens: int = 0  # tokens emitted by verification steps (prefill token not counted)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def measure_accuracy(module: nn.Module, num_heads: int, examples: list[Example], info: DistInfo, *,
                     batch_tokens: int, topk: int = 10) -> AccuracyReport:
    """Teacher-forced accuracy over `examples` (each rank takes a share; results are summed).
    `module` is the training module (or its FSDP root); the label columns are [base, heads...]."""
    offsets = label_offsets(num_heads, with_base=True)
    mine = shard_examples(examples, info.rank, info.world)
    plan = plan_sequence_batches([len(e.input_ids) for e in mine], batch_tokens, seed=0, epoch=0)
    G = num_heads + 1
    correct = torch.zeros(G, topk, dtype=torch.int64, device=info.device)
    valid = torch.zeros(G, dtype=torch.int64, device=info.device)
    loss_sum = torch.zeros(G, dtype=torch.float64, device=info.device)
    for idx, keep in equal_calls(plan, info):
        batch = collate([mine[i] for i in idx], offsets).to(info.device)
        out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels, topk=topk)
        if keep:
            correct += out.correct
            valid += out.num_valid
            loss_sum += out.group_loss.double() * out.num_valid
    reshard(module)
    for t in (correct, valid, loss_sum):
        all_reduce_(t, info)
    n = valid.clamp(min=1)
    acc = (correct.double() / n[:, None]).tolist()
    loss = (loss_sum / n).tolist()
    return AccuracyReport(acc[1:], loss[1:], valid[1:].tolist(), acc[0][0], loss[0])


def calibrated_tree(report: AccuracyReport, num_nodes: int) -> TokenTree:
    return tree_from_accuracies(per_rank_accuracies(report.topk), num_nodes)


def measure_tau(base: nn.Module, heads, trees: dict[str, TokenTree], prompts: list[list[int]],
                report: AccuracyReport, *, max_new_tokens: int, batch_size: int = 20) -> list[TauResult]:
    """Greedy Medusa decoding of `prompts` with each tree through the reference engine."""
    acc = per_rank_accuracies(report.topk)
    results = []
    try:
        from medusa_vllm.reference import MedusaReference
    except ImportError:  # an older tree without the reference engine: estimates only
        return [TauResult(name, t.num_nodes, None, expected_accept_length(t, acc)) for name, t in trees.items()]
    eos = base.generation_config.eos_token_id if base.generation_config is not None else None
    eos = eos if eos is not None else base.config.eos_token_id
    for name, tree in trees.items():
        engine = MedusaReference(base, heads, tree)
        start, emitted, steps = time.perf_counter(), 0, 0
        for i in range(0, len(prompts), batch_size):
            res = engine.generate(prompts[i:i + batch_size], max_new_tokens, eos_token_id=eos)
            emitted += round(res.tau * sum(res.steps))
            steps += sum(res.steps)
        seconds = time.perf_counter() - start
        results.append(TauResult(name, tree.num_nodes, emitted / max(steps, 1),
                                 expected_accept_length(tree, acc), len(prompts), emitted, seconds,
                                 {"steps": steps}))
    return results


def tau_prompts(examples: list[Example], count: int) -> list[list[int]]:
    """The prompts of the first `count` held-out examples (prompt = tokens before the first answer)."""
    return [e.prompt_ids for e in examples[:count]]


def summary_rows(report: AccuracyReport, taus: list[TauResult]) -> list[dict]:
    rows = [{"kind": "head_accuracy", "head": k, "tokens": report.tokens[k], "loss": report.loss[k],
             **{f"top{j + 1}": report.topk[k][j] for j in range(len(report.topk[k]))}}
            for k in range(len(report.topk))]
    rows.append({"kind": "base_accuracy", "top1": report.base_top1, "loss": report.base_loss})
    rows += [{"kind": "tau", "tree": t.tree, "num_nodes": t.num_nodes, "tau": t.tau,
              "tau_estimate": t.tau_estimate, "prompts": t.prompts, "step_tokens": t.step_tokens,
              "seconds": round(t.seconds, 2), **t.extra} for t in taus]
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from medusa_vllm.checkpoint import load_heads, save_heads
    from training.dataset import read_examples
    from training.distributed import init_distributed
    from training.model import LossConfig, MedusaTrainModel, load_base

    info = init_distributed(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = load_base(args.model, dtype=dtype, device=info.device, trainable=False)
    heads = load_heads(args.heads, dtype=torch.float32).to(info.device).eval()
    module = MedusaTrainModel(base, heads, LossConfig(chunk_size=args.ce_chunk_size), dtype)
    examples = read_examples(args.data, split=args.split)[: args.max_examples]
    report = measure_accuracy(module, heads.num_heads, examples, info, batch_tokens=args.batch_tokens,
                              topk=args.topk)
    tree = calibrated_tree(report, args.tree_nodes)
    trees = {DEFAULT_TREE: get_tree(DEFAULT_TREE), f"calibrated-{args.tree_nodes}": tree}
    taus = measure_tau(base, heads, trees, tau_prompts(examples, args.tau_prompts), report,
                       max_new_tokens=args.max_new_tokens) if args.tau_prompts else \
        [TauResult(n, t.num_nodes, None, expected_accept_length(t, per_rank_accuracies(report.topk)))
         for n, t in trees.items()]
    result = {"examples": len(examples), "top1": report.top1, "topk": report.topk,
              "calibrated_tree": tree.choices(), "rows": summary_rows(report, taus)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("topk", "calibrated_tree")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_tree:
        heads.config.tree, heads.config.head_accuracies = tree.choices(), report.topk
        save_heads(heads.cpu(), args.heads)
        print(f"wrote the calibrated tree and accuracies into {args.heads}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model HF folder")
    p.add_argument("--heads", required=True, help="heads folder (any layout)")
    p.add_argument("--data", required=True, help="token-id JSONL (python -m training.data)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--tree-nodes", type=int, default=63, help="size of the calibrated tree")
    p.add_argument("--tau-prompts", type=int, default=20, help="0: estimates only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ce-chunk-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--write-tree", action="store_true",
                   help="store the calibrated tree and accuracies in the heads' config")
    p.add_argument("--out", help="write the result as JSON here")
    return p


if __name__ == "__main__":
    main()
