"""End of a training run: gather the trained weights, evaluate on the held-out split, save the heads
(with the calibrated tree and the accuracies in their config), measure tau, write training.json."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from medusa_vllm.checkpoint import load_heads, load_lm_head_weight, save_heads
from medusa_vllm.heads import MedusaHeads
from medusa_vllm.tree import expected_accept_length, get_tree, per_rank_accuracies
from training.distributed import barrier
from training.evaluate import (DEFAULT_TREE, AccuracyReport, TauResult, calibrated_tree,
                               measure_accuracy, measure_tau, summary_rows, tau_prompts)
from training.report import device_name, envelope, write_json

if TYPE_CHECKING:
    from training.loop import Trainer


def finish(tr: Trainer) -> dict | None:
    """Collective: every rank calls it; rank 0 writes and returns the summary."""
    cfg, info = tr.cfg, tr.info
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(tr.model, options=options)  # trainable weights, on rank 0
    held = tr.held_ex[: cfg.eval_max_examples]
    report = measure_accuracy(tr.nograd, cfg.medusa_num_heads, held, info, batch_tokens=cfg.batch_tokens,
                              topk=cfg.eval_topk) if held else None
    summary = None
    if info.is_main:
        heads_dir, base_dir = save_outputs(tr, state, report)
        taus = tau_results(tr, heads_dir, base_dir, report) if report else []
        summary = write_report(tr, heads_dir, report, taus)
    barrier(info)
    return summary


def save_outputs(tr: Trainer, state: dict, report: AccuracyReport | None) -> tuple[Path, Path | None]:
    cfg, out = tr.cfg, tr.out
    heads = MedusaHeads(tr.model.heads.config)
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")})
    base_dir = save_base(tr, state) if cfg.medusa2 else None
    config = replace(heads.config, base_model=str(base_dir or cfg.base_model_name or cfg.model))
    if report is not None:
        config = replace(config, tree=calibrated_tree(report, cfg.tree_nodes).choices(),
                         head_accuracies=report.topk)
    heads.config = config
    heads_dir = out / "heads"
    save_heads(heads, heads_dir)
    print(f"saved heads to {heads_dir}", flush=True)
    if cfg.export_fasterdecoding:
        weight = load_lm_head_weight(base_dir or cfg.model)
        save_heads(heads, cfg.export_fasterdecoding, layout="fasterdecoding", lm_head_weight=weight)
        print(f"exported the FasterDecoding layout to {cfg.export_fasterdecoding}", flush=True)
    return heads_dir, base_dir


def save_base(tr: Trainer, state: dict) -> Path:
    """Medusa-2: the fine-tuned base as an HF folder (bf16 weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    base_sd = {k.removeprefix("base."): v for k, v in state.items() if k.startswith("base.")}
    model = AutoModelForCausalLM.from_pretrained(tr.cfg.model, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"base weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    out = tr.out / "base_model"
    model.to(torch.bfloat16).save_pretrained(out)
    for file in Path(tr.cfg.model).iterdir():  # tokenizer, chat template: as they were
        if file.is_file() and not (file.suffix in (".safetensors", ".bin", ".pt", ".gguf")
                                   or file.name.endswith(".index.json")
                                   or file.name in ("config.json", "generation_config.json")):
            shutil.copy2(file, out / file.name)
    print(f"saved the fine-tuned base model to {out}", flush=True)
    return out


def tau_results(tr: Trainer, heads_dir: Path, base_dir: Path | None,
                report: AccuracyReport) -> list[TauResult]:
    """tau of the saved heads on held-out prompts (reference engine, fp32), or estimates only."""
    cfg = tr.cfg
    tree = calibrated_tree(report, cfg.tree_nodes)
    trees = {DEFAULT_TREE: get_tree(DEFAULT_TREE), f"calibrated-{cfg.tree_nodes}": tree}
    acc = per_rank_accuracies(report.topk)
    if not cfg.eval_tau_prompts:
        return [TauResult(n, t.num_nodes, None, expected_accept_length(t, acc)) for n, t in trees.items()]
    from transformers import AutoModelForCausalLM

    device = tr.info.device
    base = AutoModelForCausalLM.from_pretrained(base_dir or cfg.model, dtype=torch.float32).to(device).eval()
    heads = load_heads(heads_dir, dtype=torch.float32).to(device).eval()
    prompts = tau_prompts(tr.held_ex, cfg.eval_tau_prompts)
    taus = measure_tau(base, heads, trees, prompts, report, max_new_tokens=cfg.eval_tau_max_new_tokens)
    for t in taus:
        print(f"tau ({t.tree}, {t.num_nodes} nodes): {t.tau} measured on {t.prompts} held-out prompts "
              f"({t.seconds:.1f} s), product-model estimate {t.tau_estimate:.3f}", flush=True)
    return taus


def write_report(tr: Trainer, heads_dir: Path, report: AccuracyReport | None,
                 taus: list[TauResult]) -> dict:
    cfg = tr.cfg
    by_tree = {t.tree: t for t in taus}
    default = by_tree.get(DEFAULT_TREE)
    calibrated = by_tree.get(f"calibrated-{cfg.tree_nodes}")
    summary = {
        "heads": str(heads_dir.relative_to(tr.out)),  # next to training.json
        "head_top1_acc": report.top1 if report else None,
        "mean_accepted_length_greedy": default.tau if default else None,
        "mean_accepted_length_greedy_calibrated": calibrated.tau if calibrated else None,
        "mean_accepted_length_estimate": default.tau_estimate if default else None,
        "mean_accepted_length_estimate_calibrated": calibrated.tau_estimate if calibrated else None,
        "peak_mem_fused_vs_naive": _memory_ratio(cfg.fused_ce_memory_json),
        "train_tokens_per_s": round(tr.train_positions / max(tr.train_seconds, 1e-9), 1),
        "device": device_name(tr.info.device),
    }
    config = {**asdict(cfg), "world_size": tr.info.world, "total_steps": tr.total,
              "compute_dtype": str(tr.dtype).removeprefix("torch."), "warmup_heads_steps_used": tr.warmup_heads,
              "train_examples": len(tr.train_ex), "heldout_examples": len(tr.held_ex),
              "heldout_examples_evaluated": min(len(tr.held_ex), cfg.eval_max_examples),
              "examples_without_answer_after_truncation": tr.dropped,
              "cached_rows_rank0": getattr(tr.source, "num_rows", None),
              "cache_build_s": round(tr.cache_seconds, 2), "train_s": round(tr.train_seconds, 2),
              "train_positions": tr.train_positions, "data_generation": _data_meta(cfg.data)}
    rows = (summary_rows(report, taus) if report else []) + [{"kind": "train_log", **r} for r in tr.log_rows]
    write_json(tr.out / "training.json", envelope("training", device=summary["device"], config=config,
                                                  rows=rows, summary=summary))
    return summary


def _memory_ratio(path: str | None) -> float | None:
    if not path or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())["summary"].get("peak_mem_fused_vs_naive")


def _data_meta(data: str) -> dict | None:
    meta = Path(str(data) + ".meta.json")
    return json.loads(meta.read_text()) if meta.exists() else None
