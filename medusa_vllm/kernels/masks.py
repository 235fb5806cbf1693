"""Packed tree masks: the one mask format of torch.ops.medusa_vllm.tree_attention.

A tree window of Q query tokens is described by a boolean [Q, Q] matrix: entry (i, j) is True
iff query token i may attend window key j (its ancestors, itself and the root). Packed, row i
is W = ceil(Q / 64) int64 words; bit j lives in word j // 64 at bit position j % 64.
"""

from __future__ import annotations

import torch

MASK_WORD_BITS = 64
MAX_TREE_QUERIES = 128  # kernels support at most 2 words per row


def num_mask_words(q: int) -> int:
    return (q + MASK_WORD_BITS - 1) // MASK_WORD_BITS


def _bit_weights(device: torch.device) -> torch.Tensor:
    # [64] int64: 1 << b; 1 << 63 wraps to -2**63, which is the right bit pattern.
    return torch.ones(MASK_WORD_BITS, dtype=torch.int64, device=device) << torch.arange(
        MASK_WORD_BITS, dtype=torch.int64, device=device
    )


def pack_tree_masks(masks: torch.Tensor) -> torch.Tensor:
    """[num_trees, Q, Q] bool -> [num_trees, Q, ceil(Q / 64)] int64 (Q <= 128)."""
    if masks.dim() != 3 or masks.dtype != torch.bool or masks.shape[1] != masks.shape[2]:
        raise ValueError(
            f"pack_tree_masks expects a bool tensor [num_trees, Q, Q], got {masks.dtype} {tuple(masks.shape)}"
        )
    num_trees, q, _ = masks.shape
    if not 1 <= q <= MAX_TREE_QUERIES:
        raise ValueError(f"pack_tree_masks: Q = {q} must be in [1, {MAX_TREE_QUERIES}]")
    words = num_mask_words(q)
    padded = torch.zeros(num_trees, q, words * MASK_WORD_BITS, dtype=torch.int64, device=masks.device)
    padded[:, :, :q] = masks.to(torch.int64)
    # Distinct powers of two: the (wrapping) int64 sum is the bitwise OR.
    return (padded.view(num_trees, q, words, MASK_WORD_BITS) * _bit_weights(masks.device)).sum(-1)


def unpack_tree_masks(packed: torch.Tensor, q: int | None = None) -> torch.Tensor:
    """[num_trees, Q, W] int64 -> [num_trees, Q, q] bool (q defaults to Q)."""
    if packed.dim() != 3 or packed.dtype != torch.int64:
        raise ValueError(f"unpack_tree_masks expects int64 [num_trees, Q, W], got {packed.dtype} {tuple(packed.shape)}")
    q = packed.shape[1] if q is None else q
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0  # [T, Q, W, 64]
    return bits.flatten(-2)[..., :q]
