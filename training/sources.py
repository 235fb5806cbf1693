"""Where a training step's inputs come from: sequence batches, or rows of a hidden-state cache.

Both give `steps_in_epoch(epoch)` (equal on every rank) and `batch(epoch, i)` (the keyword
arguments of MedusaTrainModel.forward), so the loop and resumption treat them alike.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from training.batching import (cached_steps_per_epoch, collate, epoch_permutation,
                               plan_sequence_batches, shard_batches, shard_examples)
from training.dataset import IGNORE, Example
from training.distributed import DistInfo, all_reduce_, equal_calls, reshard


class SequenceBatches:
    """Padded batches of whole examples; the base runs inside every step (Medusa-2, or Medusa-1
    without a cache)."""

    def __init__(self, examples: list[Example], offsets: list[int], batch_tokens: int, seed: int,
                 info: DistInfo) -> None:
        self.examples, self.offsets, self.batch_tokens, self.seed, self.info = \
            examples, offsets, batch_tokens, seed, info
        self.lengths = [len(e.input_ids) for e in examples]
        self._plan = lru_cache(maxsize=2)(self._make_plan)

    def _make_plan(self, epoch: int) -> list[list[int]]:
        plan = plan_sequence_batches(self.lengths, self.batch_tokens, self.seed, epoch)
        return shard_batches(plan, self.info.rank, self.info.world)

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._plan(epoch))

    def batch(self, epoch: int, i: int) -> dict[str, Tensor]:
        b = collate([self.examples[j] for j in self._plan(epoch)[i]], self.offsets).to(self.info.device)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}


class CachedRows:
    """Medusa-1: the frozen base's final-norm hidden states of every position with a target,
    computed once (this rank's share of the examples), stored in `dtype` on the device; an epoch
    is a fresh permutation of the rows, `batch_tokens` rows per step."""

    def __init__(self, module: nn.Module, examples: list[Example], offsets: list[int],
                 batch_tokens: int, seed: int, info: DistInfo, dtype: torch.dtype,
                 build_tokens: int | None = None) -> None:
        self.batch_tokens, self.seed, self.info = batch_tokens, seed, info
        self.hidden, self.labels = _build_cache(module, shard_examples(examples, info.rank, info.world),
                                                offsets, build_tokens or batch_tokens, info, dtype)
        steps = torch.tensor([cached_steps_per_epoch(len(self.labels), batch_tokens)], device=info.device)
        self.steps = int(all_reduce_(steps, info, op="min"))  # equal step counts on every rank
        self._perm = lru_cache(maxsize=2)(self._make_perm)

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    def _make_perm(self, epoch: int) -> Tensor:
        return epoch_permutation(self.num_rows, self.seed, epoch, self.info.rank).to(self.info.device)

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps

    def batch(self, epoch: int, i: int) -> dict[str, Tensor]:
        rows = self._perm(epoch)[i * self.batch_tokens:(i + 1) * self.batch_tokens]  # [<=batch_tokens]
        return {"hidden": self.hidden[rows], "labels": self.labels[rows]}


@torch.no_grad()
def _build_cache(module: nn.Module, examples: list[Example], offsets: list[int], batch_tokens: int,
                 info: DistInfo, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """-> hidden [M, H] (dtype), labels [M, G] int64 for the positions with any target."""
    plan = plan_sequence_batches([len(e.input_ids) for e in examples], batch_tokens, seed=0, epoch=0)
    hidden, labels = [], []
    for idx, keep in equal_calls(plan, info):
        b = collate([examples[i] for i in idx], offsets).to(info.device)
        h = module(input_ids=b.input_ids, attention_mask=b.attention_mask, mode="hidden")  # [B, T, H]
        if keep:
            sel = (b.labels != IGNORE).any(-1)  # [B, T]
            hidden.append(h[sel].to(dtype))
            labels.append(b.labels[sel])
    reshard(module)
    if not hidden:
        raise ValueError("no training positions: every example lacks answer tokens")
    return torch.cat(hidden), torch.cat(labels)
