"""Tree verification, batched over requests, pure tensors (no vLLM, no host syncs).

Inputs shared by every rule (B requests, Q = 1 + max tree nodes, D = max tree depth):

- ``logits``      [R, V]  target logits of all verified rows of the batch (any order);
- ``row_of_node`` [B, Q]  the logits row of each request's root (slot 0) and tree nodes, -1 if none;
- ``drafts``      [B, Q-1] draft token of node i+1 (padding ignored);
- ``num_nodes``   [B]     how many nodes of the request's tree were verified (its BFS prefix);
- ``tree_ids``    [B]     which tree of the :class:`TreeTensors` stack the drafts follow.

Node ``i`` is checked against the target distribution at its parent's row. Every rule returns a
:class:`VerifyOutput`: the accepted path (node ids, ascending, -1 padded), its length, the node
whose hidden state feeds the next proposal, and the emitted tokens (accepted drafts + one token
from the target: the bonus, or the correction where a draft was rejected), -1 padded.

Rules:
- greedy: accept the longest path whose tokens equal the target argmax (exact; temperature 0);
- typical (Medusa-2): accept node i if p(x_i) > min(eps, delta * exp(-H(p))) at its parent, take
  the longest accepted path (ties: the first in BFS order), then sample the last token from the
  target; fast but not distribution-preserving. Defaults eps=0.09, delta=0.3 (Medusa's
  ``medusa_generate``: posterior_threshold 0.09, posterior_alpha 0.3);
- rejection: lossless multi-draft recursive rejection sampling down the tree. Medusa's drafts are
  deterministic (top-k of each head), i.e. point masses, so at a node with target distribution p
  and children x_1..x_m (in rank order) child j is accepted with probability
  p(x_j) / (1 - sum_{i<j} p(x_i)); if all are rejected, the token is drawn from p with
  x_1..x_m removed (renormalised). Each token is then emitted with exactly probability p(x).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medusa_vllm.sampling import (
    SamplingBatch, StepRandomness, TargetParams, filters_with_target_probs, sample, target_probs, target_probs_of)
from medusa_vllm.tree_tensors import TreeTensors

TYPICAL_EPS = 0.09
TYPICAL_DELTA = 0.3

# The walk of a rejection step in one op (medusa_vllm.kernels.rejection_walk: (logits, row_of_node,
# children, drafts, valid, temperature, top_k, top_p, min_p, accept_u, final_u) -> (accepted,
# last_node, final)); None: the tensor ops below. Set by an engine adapter (set_rejection_walk).
_walk_op: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def set_rejection_walk(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None):
    """Run the rejection walk with ``fn`` (e.g. :func:`medusa_vllm.kernels.rejection_walk`: one
    kernel instead of about 200 tensor ops; steps with top-k, top-p or min-p only where
    :func:`medusa_vllm.sampling.set_target_probs` installed the filter it applies; the
    same accepted paths, and its final draws by the inverse CDF of fixed-point masses, not of
    float64 sums: the same token but where a uniform falls within rounding of a boundary);
    returns the one it replaces."""
    global _walk_op
    old, _walk_op = _walk_op, fn
    return old


@dataclass
class VerifyOutput:
    accepted: torch.Tensor  # [B, D] int64 accepted node ids, ascending, -1 pad
    num_accepted: torch.Tensor  # [B] int64
    last_node: torch.Tensor  # [B] int64 (0 = root: nothing accepted)
    tokens: torch.Tensor  # [B, D+1] int64 emitted tokens, -1 pad


@dataclass
class TreeBatch:
    """Per-request views of the tree stack (gathered once per step)."""

    parents: torch.Tensor  # [B, Q]
    children: torch.Tensor  # [B, Q, C]
    leaf_paths: torch.Tensor  # [B, P, D+1]
    valid: torch.Tensor  # [B, Q] bool: slot verified this step (root always)

    @classmethod
    def gather(cls, trees: TreeTensors, tree_ids: torch.Tensor, num_nodes: torch.Tensor):
        q = trees.parents.shape[1]
        slots = torch.arange(q, device=tree_ids.device)
        valid = slots.unsqueeze(0) <= num_nodes.unsqueeze(1)  # [B, Q]
        return cls(trees.parents[tree_ids], trees.children[tree_ids], trees.leaf_paths[tree_ids], valid)


def _node_tokens(drafts: torch.Tensor) -> torch.Tensor:
    """[B, Q-1] drafts -> [B, Q] token per slot (root slot 0 holds a dummy 0)."""
    return torch.cat([torch.zeros_like(drafts[:, :1]), drafts], dim=1).long().clamp_min(0)


def longest_accepted_path(ok: torch.Tensor, leaf_paths: torch.Tensor):
    """Choose the longest root-to-leaf prefix made of accepted nodes.

    ok [B, Q] bool (slot 0 ignored), leaf_paths [B, P, D+1] -> (accepted [B, D] node ids -1 pad,
    num_accepted [B], last_node [B]). Ties go to the first path (BFS / rank order).
    """
    b = ok.shape[0]
    nodes = leaf_paths[:, :, 1:]  # [B, P, D]
    node_ok = torch.gather(ok, 1, nodes.clamp_min(0).reshape(b, -1)).reshape(nodes.shape)
    node_ok &= nodes >= 0
    run = node_ok.long().cumprod(dim=2)  # [B, P, D] 1 while every node so far is accepted
    lengths = run.sum(dim=2)  # [B, P]
    best = lengths.argmax(dim=1)  # [B] first maximum
    num_accepted = lengths.gather(1, best.unsqueeze(1)).squeeze(1)
    path = nodes[torch.arange(b, device=ok.device), best]  # [B, D]
    depth_idx = torch.arange(path.shape[1], device=ok.device).unsqueeze(0)
    accepted = torch.where(depth_idx < num_accepted.unsqueeze(1), path, torch.full_like(path, -1))
    last = accepted.gather(1, (num_accepted - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    last_node = torch.where(num_accepted > 0, last, torch.zeros_like(last))
    return accepted, num_accepted, last_node


def _emit(drafts: torch.Tensor, accepted: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor):
    """Emitted tokens [B, D+1]: drafts of the accepted nodes, then ``final``, then -1."""
    tok = _node_tokens(drafts).gather(1, accepted.clamp_min(0))
    tok = torch.where(accepted >= 0, tok, torch.full_like(tok, -1))
    out = torch.cat([tok, torch.full_like(tok[:, :1], -1)], dim=1)
    out.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return out


def _rows(logits: torch.Tensor, row_of_node: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Logits rows [B, V] of one node per request."""
    rows = row_of_node.gather(1, nodes.unsqueeze(1)).squeeze(1).clamp_min(0)
    return logits[rows]


def verify_greedy(
    logits: torch.Tensor,
    row_of_node: torch.Tensor,
    drafts: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_ids: torch.Tensor,
    trees: TreeTensors,
) -> VerifyOutput:
    tb = TreeBatch.gather(trees, tree_ids, num_nodes)
    argmax = logits.argmax(dim=-1)[row_of_node.clamp_min(0)]  # [B, Q] target token per slot
    return greedy_from_argmax(argmax, drafts, tb)


def greedy_from_argmax(argmax: torch.Tensor, drafts: torch.Tensor, tb: TreeBatch) -> VerifyOutput:
    """Greedy rule from the target argmax of each slot ([B, Q])."""
    parent_choice = argmax.gather(1, tb.parents.clamp_min(0))  # [B, Q]
    ok = (_node_tokens(drafts) == parent_choice) & tb.valid
    accepted, num_accepted, last_node = longest_accepted_path(ok, tb.leaf_paths)
    bonus = argmax.gather(1, last_node.unsqueeze(1)).squeeze(1)
    return VerifyOutput(accepted, num_accepted, last_node, _emit(drafts, accepted, num_accepted, bonus))


def verify_typical(
    logits: torch.Tensor,
    row_of_node: torch.Tensor,
    drafts: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_ids: torch.Tensor,
    trees: TreeTensors,
    sampling: SamplingBatch,
    eps: float = TYPICAL_EPS,
    delta: float = TYPICAL_DELTA,
    rand: StepRandomness | None = None,
) -> VerifyOutput:
    """``rand``: the step's random numbers (its final uniform; drawn here if None)."""
    tb = TreeBatch.gather(trees, tree_ids, num_nodes)
    b, q = row_of_node.shape
    parent_rows = row_of_node.gather(1, tb.parents.clamp_min(0)).clamp_min(0)  # [B, Q]
    # temperature-scaled target at every parent row (top-k/top-p do not enter the rule)
    temp = sampling.target_temperature
    logp = torch.log_softmax(logits.float()[parent_rows.flatten()] / temp.repeat_interleave(q).unsqueeze(1), -1)
    logp = logp.reshape(b, q, -1)
    entropy = -(logp.exp() * logp).sum(-1)  # [B, Q]
    p_draft = logp.gather(2, _node_tokens(drafts).unsqueeze(2)).squeeze(2).exp()
    threshold = torch.minimum(torch.full_like(entropy, eps), delta * torch.exp(-entropy))
    ok = (p_draft > threshold) & tb.valid
    accepted, num_accepted, last_node = longest_accepted_path(ok, tb.leaf_paths)
    probs = target_probs(_rows(logits, row_of_node, last_node), sampling)
    final = sample(probs, sampling, None if rand is None else rand.final)
    return VerifyOutput(accepted, num_accepted, last_node, _emit(drafts, accepted, num_accepted, final))


def verify_rejection(
    logits: torch.Tensor,
    row_of_node: torch.Tensor,
    drafts: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_ids: torch.Tensor,
    trees: TreeTensors,
    sampling: SamplingBatch,
    renormalize: bool = True,
    residual: bool = True,
    rand: StepRandomness | None = None,
) -> VerifyOutput:
    """Lossless tree rejection sampling. ``rand``: the step's random numbers (uniforms for
    every level and child, one for the final token; drawn here if None). The walk stops
    exactly once per request (at a leaf at the latest), so the final token is one draw from the
    stopping node's residual. ``renormalize=False`` and ``residual=False`` are deliberately
    broken variants (child j accepted with p(x_j) instead of p(x_j)/(1 - mass of the rejected
    siblings); after rejection, a draw from p instead of the residual); they exist so the
    statistical tests can show that they catch a wrong sampler."""
    tb = TreeBatch.gather(trees, tree_ids, num_nodes)
    b, q, width = tb.children.shape
    dev = drafts.device
    depth = trees.max_depth
    if rand is None:
        rand = StepRandomness.draw(b, depth + 1, width, sampling, dev)
    params = TargetParams.of(sampling, logits.shape[-1])
    # the op filters as medusa_vllm's target_probs does: steps with a filter take it only when
    # that is the installed filter (else the tensor walk, with the engine's own filter)
    if _walk_op is not None and renormalize and residual and (
            (params.top_k is None and params.min_p is None) or filters_with_target_probs()):
        accepted_t, cur, final = _walk_op(logits, row_of_node.long(), tb.children, drafts.long(), tb.valid,
                                          sampling.temperature.float(), params.top_k, params.top_p, params.min_p,
                                          rand.accept, rand.final)
        num_accepted = (accepted_t >= 0).sum(dim=1)
        return VerifyOutput(accepted_t, num_accepted, cur, _emit(drafts, accepted_t, num_accepted, final))
    # every node's children once (the walk then indexes one [B, Q, C, 3] table per level):
    # their ids, tokens, and whether each is offered (verified, and the first offer of its token:
    # a token offered twice under one parent is only worth its first offer)
    kid_tok = _node_tokens(drafts).gather(1, tb.children.clamp_min(0).flatten(1)).view(b, q, width)
    kid_ok = (tb.children >= 0) & tb.valid.gather(1, tb.children.clamp_min(0).flatten(1)).view(b, q, width)
    earlier = torch.ones(width, width, dtype=torch.bool, device=dev).tril_(-1)
    dup = (kid_tok.unsqueeze(3) == kid_tok.unsqueeze(2)) & earlier & kid_ok.unsqueeze(2)  # [B, Q, C, C]
    table = torch.stack([tb.children, kid_tok, (kid_ok & ~dup.any(dim=3)).long()], dim=3).view(b, q, width * 3)

    def children(node):  # [B] -> the node's table entry [B, C, 3]: child id, token, offered
        return table.gather(1, node[:, None, None].expand(b, 1, width * 3)).view(b, width, 3)

    cur = torch.zeros(b, dtype=torch.int64, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    accepted = []  # per level [B] the accepted child, -1 if none
    stop_probs = None  # [B, V] the target distribution at each request's stopping node
    for level in range(depth + 1):
        probs = target_probs_of(_rows(logits, row_of_node, cur), params)  # [B, V]
        kids = children(cur)
        p_kid = probs.gather(1, kids[:, :, 1]) * (kids[:, :, 2] & active[:, None])  # [B, C] 0: not offered
        if renormalize:
            remaining = 1.0 - (p_kid.cumsum(dim=1) - p_kid)
            accept_prob = torch.where(remaining > 0, p_kid / remaining.clamp_min(1e-30), 0.0)
        else:
            accept_prob = p_kid
        hit = (rand.accept[:, level] < accept_prob) & (p_kid > 0)
        first = hit.long().argmax(dim=1)  # the first accepted child (0 if none)
        step = hit.gather(1, first[:, None])[:, 0]
        child = kids[:, :, 0].gather(1, first[:, None])[:, 0]
        if level < depth:
            accepted.append(torch.where(step, child, -1))
        # stopping here (active, nothing accepted): the final token comes from this node's target
        stop_probs = probs if stop_probs is None else torch.where((active & ~step)[:, None], probs, stop_probs)
        cur = torch.where(step, child, cur)
        active = step
    accepted_t = torch.stack(accepted, dim=1) if accepted else torch.empty(b, 0, dtype=torch.int64, device=dev)
    num_accepted = (accepted_t >= 0).sum(dim=1)
    # the final token: from the stopping node's target without its children (all rejected),
    # unnormalised (sample takes it so); p itself where they held all of its mass
    dist = stop_probs
    if residual:
        # (a child not offered repeats an offered one's token, or is not verified)
        kids = children(cur)
        rest = stop_probs.scatter_reduce(1, kids[:, :, 1], torch.where(kids[:, :, 2] > 0, 0.0, float("inf")), "amin")
        dist = torch.where(rest.sum(dim=1, keepdim=True) > 0, rest, stop_probs)
    final = sample(dist, sampling, rand.final)
    return VerifyOutput(accepted_t, num_accepted, cur, _emit(drafts, accepted_t, num_accepted, final))


def verify(
    rule: str,
    logits: torch.Tensor,
    row_of_node: torch.Tensor,
    drafts: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_ids: torch.Tensor,
    trees: TreeTensors,
    sampling: SamplingBatch,
    *,
    all_greedy: bool = False,
    eps: float = TYPICAL_EPS,
    delta: float = TYPICAL_DELTA,
    rand: StepRandomness | None = None,
) -> VerifyOutput:
    """Greedy rule for greedy requests, ``rule`` ("rejection" or "typical") for the others.

    ``all_greedy`` (host-known) skips the sampling rule entirely. ``rand``: the step's random
    numbers (:meth:`StepRandomness.draw`; drawn by the rule if None).

    Under "rejection" a greedy request's target is the point mass at its argmax
    (:func:`target_probs_of`), so the walk itself is the greedy rule: at each level it accepts
    the child whose token is the argmax, and stops with the argmax as the final token. The
    greedy rule's tokens exactly, and its path too where no two children of a node share a
    token (Medusa's drafts: a node's children are distinct ranks of one head's top-k); where
    two do, the walk follows the first (every token it emits is still its row's argmax). No
    separate greedy pass then: no argmax over every row, no second set of outputs to merge."""
    if rule not in ("rejection", "typical"):
        raise ValueError(f"unknown acceptance rule {rule!r}: use 'rejection' or 'typical'")
    if rule == "rejection" and not all_greedy:
        return verify_rejection(logits, row_of_node, drafts, num_nodes, tree_ids, trees, sampling, rand=rand)
    greedy = verify_greedy(logits, row_of_node, drafts, num_nodes, tree_ids, trees)
    if all_greedy:
        return greedy
    other = verify_typical(logits, row_of_node, drafts, num_nodes, tree_ids, trees, sampling, eps, delta, rand)
    g = sampling.is_greedy

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(g.view(-1, *([1] * (a.dim() - 1))), a, b)

    return VerifyOutput(
        pick(greedy.accepted, other.accepted),
        pick(greedy.num_accepted, other.num_accepted),
        pick(greedy.last_node, other.last_node),
        pick(greedy.tokens, other.tokens),
    )
