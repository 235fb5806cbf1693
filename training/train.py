"""Train Medusa heads: Medusa-1 (frozen base, heads only) or Medusa-2 (base + heads jointly).

    # Medusa-1 on the bundled model, one process (CPU or one GPU)
    python -m training.train --data data.jsonl --output-dir out/ --epochs 3
    # Medusa-2: base trains too (lower LR, heads warmed up first), several GPUs, sharded
    torchrun --nproc_per_node 4 -m training.train --data data.jsonl --output-dir out/ \
        --no-medusa-only-heads --warmup-heads-steps 200 --fsdp --gradient-checkpointing
    # continue an interrupted run from <output-dir>/checkpoint/state.pt
    python -m training.train ... --resume

Loss: sum_k heads_coefficient * head_decay**k * CE(head k -> token t+k+2) over answer tokens
(+ base_loss_weight * CE(base -> t+1) in Medusa-2), through the chunked fused linear +
cross-entropy (no full logits). Medusa-1 runs the frozen base once over the data under no_grad
and keeps the final-norm hidden states of the answer positions (`--cache-hidden`, the default);
the epochs then shuffle those rows.

Writes into --output-dir: heads/ (medusa_vllm layout, with the calibrated tree and the held-out
accuracies in its config), base_model/ (Medusa-2), checkpoint/state.pt, train_log.jsonl and
training.json (the results envelope). `--export-fasterdecoding DIR` also writes that layout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, fields

import torch

from training.dataset import read_examples, truncate


@dataclass
class TrainConfig:
    data: str  # token-id JSONL (python -m training.data)
    output_dir: str
    model: str | None = None  # base model HF folder; None: the bundled SmolLM2-135M-Instruct
    medusa_only_heads: bool = True  # Medusa-1; False: Medusa-2 (joint)
    medusa_num_heads: int = 4
    medusa_num_layers: int = 1
    own_lm_heads: bool = False
    lr: float = 1e-3  # heads
    base_lr: float = 2e-5  # Medusa-2 base
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 5% of the steps
    min_lr_ratio: float = 0.0  # cosine floor, as a share of the peak LR
    warmup_heads_steps: int | None = None  # Medusa-2: base frozen for these steps (None: 25%)
    head_decay: float = 0.8
    heads_coefficient: float | None = None  # None: 1.0 (Medusa-1), 0.2 (Medusa-2)
    base_loss_weight: float = 1.0  # Medusa-2
    max_grad_norm: float = 1.0
    epochs: float = 2.0
    max_steps: int | None = None
    batch_tokens: int = 8192  # per process and step: padded tokens, or cached rows
    max_length: int = 2048
    cache_hidden: bool | None = None  # None: on for Medusa-1
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    ce_chunk_size: int | None = None
    ce_backend: str = "chunked"
    seed: int = 0
    save_every: int = 500
    resume: bool = False
    log_every: int = 10
    eval_every: int = 0
    eval_max_examples: int = 512
    eval_topk: int = 10
    tree_nodes: int = 63
    eval_tau_prompts: int = 0
    eval_tau_max_new_tokens: int = 128
    export_fasterdecoding: str | None = None
    base_model_name: str | None = None  # provenance stored in the heads' config (default: --model)
    fused_ce_memory_json: str | None = None  # fills summary.peak_mem_fused_vs_naive
    progress: bool = True

    def __post_init__(self) -> None:
        medusa2 = not self.medusa_only_heads
        if self.heads_coefficient is None:
            self.heads_coefficient = 0.2 if medusa2 else 1.0
        if self.cache_hidden is None:
            self.cache_hidden = not medusa2
        if self.cache_hidden and medusa2:
            raise ValueError("--cache-hidden needs a frozen base (Medusa-1, --medusa-only-heads)")
        if self.ce_backend not in ("chunked", "liger", "auto"):
            raise ValueError(f"--ce-backend must be chunked, liger or auto, got {self.ce_backend!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        for name in ("medusa_num_heads", "medusa_num_layers", "batch_tokens", "max_length",
                     "log_every", "save_every", "tree_nodes", "eval_topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("give --epochs > 0 or --max-steps")
        if self.lr <= 0 or self.base_lr < 0:
            raise ValueError("--lr must be positive and --base-lr non-negative")

    @property
    def medusa2(self) -> bool:
        return not self.medusa_only_heads

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


def lr_lambdas(total: int, warmup: int, min_ratio: float, delay: int = 0):
    """Linear warm-up then cosine decay to min_ratio, starting `delay` steps late (0 before)."""
    def f(step: int) -> float:
        s, n = step - delay, max(1, total - delay)
        if s < 0:
            return 0.0
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, n - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def load_splits(cfg: TrainConfig, vocab_size: int) -> tuple[list, list, int]:
    """(train, held-out examples truncated to max_length, examples left without answer tokens)."""
    examples = read_examples(cfg.data, vocab_size=vocab_size)
    kept = [t for e in examples if (t := truncate(e, cfg.max_length)) is not None]
    train = [e for e in kept if e.split == "train"]
    held = [e for e in kept if e.split == "heldout"]
    if not train:
        raise ValueError(f"{cfg.data}: no training examples (split 'train')")
    return train, held, len(examples) - len(kept)


HELP = {
    "data": "token-id JSONL from python -m training.data",
    "output_dir": "heads/, checkpoint/, train_log.jsonl, training.json go here",
    "model": "base model HF folder (default: the bundled SmolLM2-135M-Instruct)",
    "medusa_only_heads": "Medusa-1 (frozen base); --no-medusa-only-heads or --medusa2: Medusa-2",
    "medusa_num_heads": "K heads; head k predicts token t+k+2",
    "medusa_num_layers": "ResBlocks per head",
    "own_lm_heads": "a vocab projection per head (initialised from the base lm_head) instead of sharing it",
    "lr": "peak LR of the heads", "base_lr": "Medusa-2: peak LR of the base",
    "weight_decay": "AdamW weight decay", "warmup_steps": "linear warm-up steps (default: 5%%)",
    "min_lr_ratio": "cosine floor as a share of the peak LR",
    "warmup_heads_steps": "Medusa-2: first steps train only the heads (default: 25%% of the run)",
    "head_decay": "head k's loss weight is heads_coefficient * head_decay**k",
    "heads_coefficient": "weight of the heads' losses (default: 1.0 Medusa-1, 0.2 Medusa-2)",
    "base_loss_weight": "Medusa-2: weight of the base LM loss",
    "max_grad_norm": "gradient clipping (0: off)",
    "epochs": "passes over the training split (fractions allowed)",
    "max_steps": "stop after this many steps",
    "batch_tokens": "per process and step: padded tokens (sequence batches) or cached rows",
    "max_length": "examples are cut to this many tokens",
    "cache_hidden": "Medusa-1: run the frozen base once and keep its hidden states (default: on)",
    "dtype": "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32",
    "device": "cpu or cuda (default: cuda if available)",
    "gradient_checkpointing": "Medusa-2: recompute the base's activations in the backward pass",
    "fsdp": "under torchrun: shard with FSDP2 instead of DDP",
    "ce_chunk_size": "fused cross-entropy rows per chunk (default: by vocab size)",
    "ce_backend": "fused cross-entropy: chunked, liger (CUDA, if installed) or auto",
    "seed": "seed of the data order and the initialisation",
    "save_every": "write checkpoint/state.pt every N steps (and at the end)",
    "resume": "continue from <output-dir>/checkpoint/state.pt when it exists",
    "log_every": "log losses / top-1 / tokens/s every N steps",
    "eval_every": "held-out top-1 every N steps (0: only at the end)",
    "eval_max_examples": "held-out examples used for evaluation",
    "eval_topk": "accuracies top-1 .. top-k (k=10 calibrates trees)",
    "tree_nodes": "size of the tree calibrated from the accuracies",
    "eval_tau_prompts": "held-out prompts for tau with the reference engine (0: estimate only)",
    "eval_tau_max_new_tokens": "new tokens per prompt in the tau measurement",
    "export_fasterdecoding": "also write the heads in the FasterDecoding layout to this folder",
    "base_model_name": "provenance stored in the heads' config (default: --model)",
    "fused_ce_memory_json": "JSON of benchmarks/fused_ce_memory.py for summary.peak_mem_fused_vs_naive",
    "progress": "tqdm progress bar",
}
_TYPES = {"bool": bool, "bool | None": bool, "int": int, "int | None": int, "float": float,
          "float | None": float}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _TYPES.get(str(f.type), str)
        required = f.name in ("data", "output_dir")
        text = HELP[f.name] + ("" if required or f.default is None else f" (default: {f.default})")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type=kind, required=required, default=None if required else f.default,
                           help=text)
    p.add_argument("--medusa2", dest="medusa_only_heads", action="store_false",
                   help="same as --no-medusa-only-heads")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    from training.loop import Trainer

    try:
        summary = Trainer(cfg).run()
    except ValueError as e:
        sys.exit(f"error: {e}")
    if summary is not None:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

