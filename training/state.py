"""Resumable training state: `<output_dir>/checkpoint/state.pt`, the latest one only.

Holds the step, the run's config, the trainable parameters (heads; the base too in Medusa-2),
the optimizer and scheduler states and the RNG states. Parameters and optimizer state are
gathered as full (unsharded) tensors through torch.distributed.checkpoint.state_dict, so one file
serves a single process, DDP and FSDP, and a run may resume on another world size (the batch
plan is then re-cut for the new world size). Rank 0 writes the file (atomically: a temporary
file renamed into place); every rank reads it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

STATE_FORMAT, STATE_VERSION = "medusa_vllm-train-state", 1
# config keys that must match to resume (the others, e.g. log or save intervals, may change)
RESUME_KEYS = ("model", "data", "medusa_only_heads", "medusa_num_heads", "medusa_num_layers",
               "own_lm_heads", "seed", "batch_tokens", "max_length", "epochs", "cache_hidden")


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoint" / "state.pt"


def save_state(path: Path, *, step: int, config: dict[str, Any], model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler, is_main: bool) -> None:
    """Collective under DDP/FSDP: every rank calls it; rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if not is_main:
        return
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "config": config,
             "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rng}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, *, config: dict[str, Any], model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore everything saved by save_state; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not a medusa_vllm training state (format {state.get('format')!r}, "
                         f"version {state.get('version')!r})")
    differ = {k: (state["config"].get(k), config.get(k)) for k in RESUME_KEYS
              if state["config"].get(k) != config.get(k)}
    if differ:
        raise ValueError(f"{path}: cannot resume, the run's settings changed: " +
                         ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in differ.items()) +
                         "; use the same settings or another --output-dir")
    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["step"])
