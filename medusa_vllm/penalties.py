"""Repetition, presence and frequency penalties on tree logits (pure torch, no host syncs).

Without speculation, the logits of a request's next token are penalized by the tokens it has
output so far (and, for the repetition penalty, its prompt). In a tree, the logits row of slot
``s`` predicts the token after ``s``: had the path root -> ``s`` been accepted, the output would
be the request's output so far plus the draft tokens on that path. So each row gets the
penalties of its own history: the request's counts plus its path's tokens. Only the entries a
penalty can change are computed — the prompt's, the output's and the path's tokens, a few
hundred per row instead of the vocabulary — each from its raw value with its own counts: the
same elementwise operations as vLLM's ``apply_penalties`` (repetition, then frequency, then
presence), so a greedy request's argmax is the one vLLM picks without speculation, bit for bit.

Shapes: R logits rows, V vocabulary, B requests, Q slots per request (1 + tree nodes), D the
deepest path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# chunk of the allowed-token pass (full vocabulary, in place): rows * V elements per chunk at most
_CHUNK_ELEMENTS = 1 << 24


def repetition_penalties_torch(logits: torch.Tensor, prompt_mask: torch.Tensor, output_mask: torch.Tensor,
                               penalties: torch.Tensor) -> None:
    """In place: a token seen in the prompt or output has its logit divided by the penalty if
    positive, multiplied if not (vLLM's ``apply_repetition_penalties_torch``, same operations)."""
    p = torch.where(prompt_mask | output_mask, penalties.unsqueeze(1).expand_as(logits), 1.0)
    logits *= torch.where(logits > 0, 1.0 / p, p)


RepetitionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class LogitBias:
    """Per-request additive biases (OpenAI's ``logit_bias``): E entries over the batch."""

    req: torch.Tensor  # [E] int64 request of each entry
    token: torch.Tensor  # [E] int64 token it biases
    value: torch.Tensor  # [E] float32 added to that token's logit
    max_rows: int  # Q: the most rows a request has (1 + the largest tree's nodes), host-known


def add_logit_bias(logits: torch.Tensor, req: torch.Tensor, bias: LogitBias) -> torch.Tensor:
    """In place: every row of a request gets its biases added, ``logits[row, token] += value``
    (vLLM's ``LogitBiasLogitsProcessor`` on the row's request). ``req`` [R] must be sorted (rows
    grouped by request, as the tree rows are), every request with at least one row. No host
    sync: each entry is spread over Q row slots, those past its request's rows adding 0.0 to a
    row it has (x + 0.0 is x), so the accumulation adds each bias once."""
    r = logits.shape[0]
    if bias.req.numel() == 0 or r == 0:
        return logits
    start = torch.searchsorted(req, bias.req)  # [E] first row of each entry's request
    end = torch.searchsorted(req, bias.req, right=True)  # [E] one past its last
    slots = torch.arange(bias.max_rows, device=logits.device)
    rows = start[:, None] + slots[None, :]  # [E, Q]
    valid = rows < end[:, None]
    rows = torch.where(valid, rows, start[:, None].clamp_max(r - 1))
    values = torch.where(valid, bias.value[:, None].to(logits.dtype), 0.0)
    tokens = bias.token[:, None].expand_as(rows)
    logits.index_put_((rows.reshape(-1), tokens.reshape(-1)), values.reshape(-1), accumulate=True)
    return logits


@dataclass
class Penalties:
    """Per-request penalty state of a step (B requests); the first five None: no penalties."""

    prompt_mask: torch.Tensor | None  # [B, V] bool: token in the prompt
    output_counts: torch.Tensor | None  # [B, V] int64: times the token was output so far
    presence: torch.Tensor | None  # [B] float32
    frequency: torch.Tensor | None  # [B] float32
    repetition: torch.Tensor | None  # [B] float32
    allowed_mask: torch.Tensor | None = None  # [B, V] bool: True = not allowed (-inf)
    repetition_fn: RepetitionFn = repetition_penalties_torch  # vLLM's op in the engine
    # [B, C] the tokens a penalty can touch besides a row's path: the prompt's and the output's
    # (repeats and padding allowed: any value outside [0, V) is padding); needed with penalties
    candidates: torch.Tensor | None = None
    bias: LogitBias | None = None  # logit_bias entries (added first, as vLLM's sampler orders them)


def path_tokens(
    slot_tokens: torch.Tensor,  # [B, Q] token of each slot (slot 0, the root, unused)
    parents: torch.Tensor,  # [B, Q] parent slot of each slot (-1 for the root)
    req: torch.Tensor,  # [R] request of each row
    slot: torch.Tensor,  # [R] slot of each row (0: the root)
    depth: int,  # D: the deepest node
) -> torch.Tensor:
    """[R, D] the draft tokens on the path root -> slot of each row (the slot's own first,
    then its ancestors; the root's token is already output), -1 padded."""
    out = torch.full((req.shape[0], depth), -1, dtype=torch.int64, device=req.device)
    anc = slot.long()
    for d in range(depth):
        on_path = anc > 0
        out[:, d] = torch.where(on_path, slot_tokens[req, anc], -1)
        anc = torch.where(on_path, parents[req, anc], 0)
    return out


def apply_tree_penalties(
    logits: torch.Tensor,  # [R, V] float32, penalized in place
    req: torch.Tensor,  # [R] int64 request of each row
    path: torch.Tensor,  # [R, D] int64 path tokens of each row (path_tokens), -1 pad
    pen: Penalties,
) -> torch.Tensor:
    """Each row's logits as vLLM's sampler would process them with the request's output so far
    plus the row's path: its logit biases, then its penalties (and -inf outside its allowed
    tokens, which vLLM applies first: -inf stays -inf through both). Returns ``logits``."""
    r, v = logits.shape
    if pen.bias is not None:
        add_logit_bias(logits, req, pen.bias)
    if pen.output_counts is not None:
        _penalize(logits, req, path, pen)
    if pen.allowed_mask is not None:
        step = max(1, _CHUNK_ELEMENTS // max(v, 1))
        for s in range(0, r, step):
            logits[s : s + step].masked_fill_(pen.allowed_mask[req[s : s + step]], float("-inf"))
    return logits


def _penalize(logits: torch.Tensor, req: torch.Tensor, path: torch.Tensor, pen: Penalties) -> None:
    """Only the entries a penalty can change: the request's prompt and output tokens and the
    row's path tokens (an entry of any other token would stay x * 1 - 0 - 0 = x, bit for bit).
    Each entry is recomputed from its raw value with its own counts, so an entry listed twice
    (a token in the prompt and the output, a padding entry) writes the same value twice."""
    v = logits.shape[1]
    if pen.candidates is None:
        raise ValueError("Penalties.candidates: the prompt's and output's tokens are needed")
    idx = torch.cat([pen.candidates[req], path], dim=1)  # [R, C + D]
    idx = torch.where((idx >= 0) & (idx < v), idx, 0)  # padding: token 0, recomputed as any entry
    valid = path >= 0
    occ = ((idx.unsqueeze(2) == path.unsqueeze(1)) & valid.unsqueeze(1)).sum(2)  # path occurrences
    rows_req = req.unsqueeze(1).expand_as(idx)
    counts = pen.output_counts[rows_req, idx] + occ  # [R, C + D] with the path counted in
    raw = logits.gather(1, idx)  # before any penalty
    pen.repetition_fn(raw, pen.prompt_mask[rows_req, idx], counts > 0, pen.repetition[req])
    raw -= pen.frequency[req].unsqueeze(1) * counts
    raw -= pen.presence[req].unsqueeze(1) * (counts > 0)
    logits.scatter_(1, idx, raw)
