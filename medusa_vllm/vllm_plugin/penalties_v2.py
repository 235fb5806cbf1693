"""Repetition, presence and frequency penalties of tree rows on vLLM's V2 runner.

V2 keeps each request slot's penalty state on the device (``PenaltiesState``): the prompt's
tokens as a bit mask, the output's as counts over the vocabulary (its bookkeeping adds every
emitted token), and the three penalties. Its own penalty kernel counts the earlier *positions*
of a request's query as output, a chain; a tree row must count its *path* instead. So the rows
go through :func:`medusa_vllm.penalties.apply_tree_penalties`, the same elementwise operations
as V2's kernel (float32: repetition, then frequency, then presence), with the state read from
V2: a greedy request's argmax stays the one V2 picks without speculation.
"""

from __future__ import annotations

import numpy as np
import torch

from medusa_vllm.packed_step import slot_rows
from medusa_vllm.penalties import Penalties, apply_tree_penalties, path_tokens, repetition_penalties_torch
from medusa_vllm.tree_tensors import TreeTensors


def any_penalty(state, idx_np: np.ndarray) -> bool:
    """Some request of the step has a penalty (host; V2's ``use_penalty`` per slot)."""
    return bool(state.use_penalty[idx_np].any())


def unpack_prompt_mask(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 bit words (token 32w + b is bit b of word w) -> [B, V] bool."""
    bits = (packed.unsqueeze(-1) >> torch.arange(32, device=packed.device, dtype=packed.dtype)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :vocab].bool()


def v2_penalties(state, all_token_ids: torch.Tensor, total_len: torch.Tensor, idx: torch.Tensor,
                 width: int, vocab: int) -> Penalties:
    """The step's penalty state from V2's (``state``: its ``PenaltiesState``; ``idx`` [B] the
    requests' slots; ``all_token_ids`` [slots, max_model_len] and ``total_len`` [slots]: each
    slot's prompt and output tokens; ``width``: a host bound on the longest of those)."""
    idx = idx.long()
    tokens = all_token_ids[idx, :width].long()  # [B, width]
    pos = torch.arange(width, device=tokens.device)
    candidates = torch.where(pos[None, :] < total_len[idx].long()[:, None], tokens, -1)
    return Penalties(
        prompt_mask=unpack_prompt_mask(state.prompt_bin_mask[idx], vocab),
        output_counts=state.output_bin_counts[idx],
        presence=state.presence_penalty.gpu[idx].float(),
        frequency=state.frequency_penalty.gpu[idx].float(),
        repetition=state.repetition_penalty.gpu[idx].float(),
        allowed_mask=None,
        repetition_fn=repetition_penalties_torch,  # V2's kernel: the same float32 operations
        candidates=candidates,
    )


def packed_tree_logits(
    logits: torch.Tensor,  # [L, V] logits rows of the step (V2's packed layout)
    tokens: torch.Tensor,  # [L] query token of every logits row (root, then the drafts)
    cu_num_logits: torch.Tensor,  # [R+1]
    local_pos: torch.Tensor,  # [L] row offset within its request (node id)
    tree_ids: torch.Tensor,  # [R] tree of each request
    trees: TreeTensors,
    pen: Penalties,
) -> torch.Tensor:
    """A float32 copy of ``logits`` with each row penalized as V2 would penalize the next token
    had the row's path been accepted (no host syncs)."""
    r = tree_ids.shape[0]
    n, _ = logits.shape
    q = trees.parents.shape[1]
    rows, valid = slot_rows(cu_num_logits, q, n)
    slot_tokens = torch.where(valid, tokens[rows].long(), 0)  # [R, Q] (slot 0, the root, unused)
    counts = (cu_num_logits[1:] - cu_num_logits[:-1]).long()
    req = torch.repeat_interleave(torch.arange(r, device=logits.device), counts, output_size=n)  # [L]
    path = path_tokens(slot_tokens, trees.parents[tree_ids], req, local_pos.long(), trees.max_depth)
    return apply_tree_penalties(logits.to(torch.float32, copy=True), req, path, pen)
