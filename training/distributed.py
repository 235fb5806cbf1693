"""One process, or torchrun with DDP or FSDP (FSDP2 `fully_shard`): set-up, wrapping, reductions.

Under torchrun (WORLD_SIZE > 1) the process group uses NCCL on CUDA and gloo on CPU. DDP wraps
the whole training module (`broadcast_buffers=False`: the rotary buffers are identical
everywhere; `find_unused_parameters` for Medusa-2, whose base sits out the heads' warm-up).
FSDP shards every decoder layer of the base, then the root (embeddings, lm_head, final norm,
heads), so the tied lm_head weight is whole inside the root's forward, where the loss runs.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; device None: cuda if available, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(f"cuda:{local}") if kind == "cuda" else torch.device(kind)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    """Every rank together (a barrier first), after the wrappers that hold the group are freed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, *, fsdp: bool, find_unused: bool,
               param_dtype: torch.dtype) -> nn.Module:
    """The module to call for training steps (the model itself when not distributed)."""
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in getattr(model.base.base_model, "layers", []):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)


def no_grad_module(model: nn.Module, wrapped: nn.Module, fsdp: bool) -> nn.Module:
    """The module for no-grad passes (caches, evaluation): FSDP must go through its root (its
    forward gathers the shards, so every rank must make the same number of calls, see
    `equal_calls`); DDP is bypassed (no collectives)."""
    return wrapped if fsdp else model


def equal_calls(items: list[T], info: DistInfo) -> Iterator[tuple[T, bool]]:
    """Yield (item, keep) so that every rank yields the same number of times: ranks with fewer
    items repeat their first item with keep=False (FSDP forwards are collectives)."""
    count = len(items)
    if info.distributed:
        t = torch.tensor([count], device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t)
    for i in range(count):
        if i < len(items):
            yield items[i], True
        elif items:
            yield items[0], False
        else:
            raise RuntimeError("equal_calls: this rank has no items while others do; "
                               "give every rank at least one example")


def reshard(module: nn.Module) -> None:
    """After no-grad passes through an FSDP root: free the gathered parameters (the root keeps
    them after a forward that no backward follows) so optimizer and checkpoints see the shards."""
    if hasattr(module, "reshard"):
        module.reshard()


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
