"""Batch plans (which examples or cached rows each step sees) and their split across ranks.

Every rank computes the same plan from (seed, epoch) and takes its share, so no sampler state has
to be saved: resuming at global step s replays the plan and skips the first steps. Each epoch is
shuffled, cut into mega-batches, sorted by length inside each mega-batch (little padding), packed
under a token budget, and the batch order shuffled again.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from training.dataset import IGNORE, Example, make_labels


def plan_sequence_batches(lengths: list[int], batch_tokens: int, seed: int, epoch: int,
                          megabatch: int = 64) -> list[list[int]]:
    """Example indices per batch for one epoch; a batch's padded size (len(batch) * its longest
    example) stays within `batch_tokens` (a longer example gets a batch of its own)."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    avg = max(1, batch_tokens // max(1, sum(lengths) // max(1, len(lengths))))
    span = megabatch * avg
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start:start + span], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in group:
            if batch and (len(batch) + 1) * max(lengths[i], lengths[batch[-1]]) > batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s batches: every world-th batch, cut to the same count on every rank (DDP
    needs equal step counts; at most world-1 batches of the epoch are dropped)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    steps = len(batches) // world
    return batches[rank: steps * world: world]


def shard_examples(examples: list, rank: int, world: int) -> list:
    """A disjoint share of the examples (for per-rank hidden-state caches and evaluation)."""
    return examples[rank::world]


@dataclass
class SequenceBatch:
    input_ids: Tensor  # [B, T] int64, right-padded with 0
    attention_mask: Tensor  # [B, T] int64, 1 = real token
    labels: Tensor  # [B, T, G] int64, IGNORE where no target

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device, non_blocking=True) for t in
                               (self.input_ids, self.attention_mask, self.labels)))


def collate(examples: list[Example], offsets: list[int]) -> SequenceBatch:
    T = max(len(e.input_ids) for e in examples)
    B, G = len(examples), len(offsets)
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    labels = torch.full((B, T, G), IGNORE, dtype=torch.int64)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = make_labels(e, offsets)
    return SequenceBatch(ids, mask, labels)


def cached_steps_per_epoch(num_rows: int, batch_tokens: int) -> int:
    return max(1, -(-num_rows // batch_tokens))


def epoch_permutation(num_rows: int, seed: int, epoch: int, rank: int) -> Tensor:
    """[num_rows] row order of one epoch over a rank's hidden-state cache; step s of the epoch
    takes rows perm[s * batch_tokens : (s + 1) * batch_tokens]."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 1009 + rank) & 0x7FFF_FFFF)
    return torch.randperm(num_rows, generator=gen)
