"""Tree steps whose logits rows are *packed* per request (vLLM's V2 runner layout), pure tensors.

vLLM 0.26's V2 runner computes logits for every query token of a request with drafts and one row
for any other request, packed in batch order: request r owns rows ``cu[r] .. cu[r+1]``
(``cu_num_logits``). For a decoding request with n drafts those rows are its root and its first
n tree nodes in BFS order, so row offset j within the request is tree node j. Its query tokens
(``input_ids`` at the same rows) are the root's token and the drafts.

These functions turn that layout into the fixed ``[B, Q]`` slots :mod:`medusa_vllm.verify`
works on, with device index arithmetic only (no host syncs, no vLLM):

- :func:`tree_positions_delta`: what RoPE must add to vLLM's linear positions (``depth - j``);
- :func:`slot_rows`: each request's logits row of slot j (clamped) and whether it exists;
- :func:`greedy_packed`: the greedy rule on any mix of requests (no drafts, some, all);
- :func:`hidden_rows`: the token row whose hidden state feeds each request's next drafts;
- :func:`num_sampled_and_rejected`: what V2's bookkeeping needs of a verified step.
"""

from __future__ import annotations

import torch

from medusa_vllm.tree_tensors import TreeTensors
from medusa_vllm.verify import TreeBatch, VerifyOutput, greedy_from_argmax


def tree_positions_delta(
    local_pos: torch.Tensor,  # [L] int: row offset of each logits row within its request
    offsets: torch.Tensor,  # [Q] int64: depth(j) - j of the tree's slots (0 at the root)
) -> torch.Tensor:
    """[L] int64 to add to the positions of the logits rows' tokens: a request with drafts has a
    row per query token, so row offset j is node j (BFS prefix of the tree); any other request
    has one row at offset 0, whose delta is 0."""
    return offsets[local_pos.long()]


def slot_rows(cu_num_logits: torch.Tensor, q: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_num_logits [R+1] -> (rows [R, q] int64: the logits row of each request's slot j,
    clamped into [0, num_rows), valid [R, q] bool: the slot exists this step)."""
    cu = cu_num_logits.long()
    j = torch.arange(q, device=cu.device)
    rows = cu[:-1, None] + j  # [R, q]
    valid = j[None, :] < (cu[1:] - cu[:-1])[:, None]
    return rows.clamp(0, max(num_rows - 1, 0)), valid


def greedy_packed(
    argmax: torch.Tensor,  # [L] int64 target argmax of every logits row
    tokens: torch.Tensor,  # [L] int query token of every logits row (root, then the drafts)
    cu_num_logits: torch.Tensor,  # [R+1] int32
    tree_ids: torch.Tensor,  # [R] int64 tree each request's drafts follow
    trees: TreeTensors,
) -> tuple[VerifyOutput, torch.Tensor]:
    """The greedy rule on a packed step -> (VerifyOutput over [R] requests, last_row [R] int64:
    the logits row of each request's last accepted node). A request with one row (no drafts, a
    prefill chunk) accepts nothing and emits the argmax of its row."""
    q = trees.parents.shape[1]
    rows, valid = slot_rows(cu_num_logits, q, argmax.shape[0])
    num_nodes = valid.sum(dim=1) - 1  # [R] verified nodes (its BFS prefix)
    slots = argmax[rows]  # [R, Q]; invalid slots are masked by the tree batch's valid
    nodes = tokens[rows[:, 1:]]  # [R, Q-1] draft token of node j+1
    out = greedy_from_argmax(slots, nodes, TreeBatch.gather(trees, tree_ids, num_nodes))
    last_row = cu_num_logits[:-1].long() + out.last_node
    return out, last_row


def hidden_rows(logits_indices: torch.Tensor, last_row: torch.Tensor) -> torch.Tensor:
    """[R] token rows (into the forward's hidden states) of each request's last accepted node,
    from ``logits_indices`` [L] (token row of each logits row) and ``last_row`` [R]."""
    return logits_indices[last_row]


def path_rows(cu_num_logits: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """[R * (D+1)] int64 logits row of each request's emitted tokens, in order: its root row,
    then the row of each accepted node (``accepted`` [R, D] window offsets, root = 0, -1 pad;
    a pad names the root row, whose value is then unused). ``cu_num_logits`` [R+1] int32."""
    nodes = torch.cat([torch.zeros_like(accepted[:, :1]), accepted], dim=1).long().clamp_min(0)
    return (cu_num_logits[:-1, None].long() + nodes).flatten()


def reject_rows(out: VerifyOutput, last_row: torch.Tensor, sel: torch.Tensor, root_tokens: torch.Tensor,
                cu_num_logits: torch.Tensor) -> tuple[VerifyOutput, torch.Tensor]:
    """The step with the drafts of requests ``sel`` [R] bool rejected: each of them emits its
    ``root_tokens`` [R] entry (its root row's token from vLLM's own sampler) and accepts
    nothing; the others keep ``out`` and ``last_row`` [R]. For requests whose options the tree
    rows do not reproduce (bad words, min_tokens, ...): speculation then costs such a request
    its drafts, never exactness. Returns the output and each request's last row."""
    s = sel[:, None]
    first = torch.where(sel, root_tokens.to(out.tokens.dtype), out.tokens[:, 0])
    tokens = torch.cat([first[:, None], torch.where(s, -1, out.tokens[:, 1:])], dim=1)
    return (VerifyOutput(torch.where(s, -1, out.accepted), torch.where(sel, 0, out.num_accepted),
                         torch.where(sel, 0, out.last_node), tokens),
            torch.where(sel, cu_num_logits[:-1].long(), last_row))


def reject_all(out: VerifyOutput, root_tokens: torch.Tensor,
               cu_num_logits: torch.Tensor) -> tuple[VerifyOutput, torch.Tensor]:
    """:func:`reject_rows` for every request."""
    sel = torch.ones_like(root_tokens, dtype=torch.bool)
    return reject_rows(out, cu_num_logits[:-1].long(), sel, root_tokens, cu_num_logits)


def num_sampled_and_rejected(
    num_accepted: torch.Tensor,  # [R] accepted nodes
    seq_lens: torch.Tensor,  # [R] context + query of each request
    cu_num_logits: torch.Tensor,  # [R+1]
    prefill_len: torch.Tensor,  # [R] each request's prompt length
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_sampled [R] int32: tokens emitted, num_rejected [R] int32: logits rows not kept), as
    vLLM's V2 ``get_num_sampled_and_rejected`` counts them: a request still inside its prompt
    (a chunk that ends before ``prefill_len``) emits nothing and rejects nothing. V2 then
    advances each request's computed tokens by ``query_len - num_rejected``."""
    chunk = seq_lens < prefill_len
    num_sampled = torch.where(chunk, 0, num_accepted + 1).int()
    rows = (cu_num_logits[1:] - cu_num_logits[:-1]).int()
    return num_sampled, torch.where(chunk, 0, rows - num_sampled).int()
