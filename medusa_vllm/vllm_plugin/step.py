"""Host-side bookkeeping of one engine step, as pure NumPy functions (no vLLM, no torch).

vLLM schedules a decoding request as ``1 + n`` query tokens: its last emitted token (the tree
root) and the first ``n`` nodes of its tree in BFS order. vLLM gives them linear positions
``c, c+1, …, c+n`` and writes their KV to the matching slots; RoPE must instead see
``c + depth(node)``, and attention must follow the tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medusa_vllm.tree import TokenTree


@dataclass
class StepPlan:
    position_delta: np.ndarray  # [num_tokens] int64: add to vLLM's linear positions
    num_tree_reqs: int  # leading requests attended by the tree kernel (short queries, after reorder)
    num_tree_tokens: int  # their query tokens
    mask_ids: np.ndarray  # [num_reqs] int32: 0 = causal chain, k + 1 = tree k
    tree_ids: np.ndarray  # [num_reqs] int64: tree of each request's drafts (0 if none)

    @property
    def all_reqs(self) -> bool:
        """Every request goes to the tree kernel: the shape a CUDA graph of a uniform batch has."""
        return self.num_tree_reqs == len(self.mask_ids)


def position_offsets(trees: list[TokenTree]) -> list[np.ndarray]:
    """Per tree, ``depth(i) - i`` for slots i = 0..T (0 at the root)."""
    return [t.depths - np.arange(t.num_nodes + 1) for t in trees]


def plan_step(
    num_scheduled: np.ndarray,  # [B] query tokens per request (batch order)
    num_drafts: np.ndarray,  # [B] scheduled draft tokens per request
    tree_ids: np.ndarray,  # [B] tree each request's drafts follow
    done_prefill: np.ndarray,  # [B] bool: num_computed >= num_prompt (a decode, not a chunk)
    offsets: list[np.ndarray],  # position_offsets(trees)
    max_query: int,  # 1 + the largest tree: longest query the tree kernel takes
) -> StepPlan:
    b = len(num_scheduled)
    starts = np.concatenate([[0], np.cumsum(num_scheduled)[:-1]]).astype(np.int64)
    delta = np.zeros(int(num_scheduled.sum()), dtype=np.int64)
    for r in np.flatnonzero(num_drafts > 0):
        n = int(num_drafts[r])
        # drafts sit after the root: slots 1..n of the request's query
        delta[starts[r] + 1 : starts[r] + 1 + n] = offsets[tree_ids[r]][1 : n + 1]
    # Decodes go to the tree kernel: vLLM sorts them first (reorder_batch_threshold) and the
    # kernel takes that leading run; prefill chunks go to vLLM's backend, so a prompt's KV is
    # computed exactly as without speculation. (Mask 0, the causal chain, would be right for a
    # chunk of <= max_query tokens too: a FULL CUDA graph of a uniform batch that holds one
    # runs it through the kernel.)
    # A step in which no request has drafts (the load-adaptive policy turned speculation off,
    # or nothing was proposed) is a plain decode step: all of it goes to vLLM's backend.
    fits = done_prefill & (num_scheduled <= max_query)
    if not num_drafts.any():
        lead = 0
    else:
        lead = b if fits.all() else int(np.argmin(fits))
    mask_ids = np.where(num_drafts > 0, tree_ids + 1, 0).astype(np.int32)
    return StepPlan(
        position_delta=delta,
        num_tree_reqs=lead,
        num_tree_tokens=int(num_scheduled[:lead].sum()),
        mask_ids=mask_ids,
        tree_ids=np.where(num_drafts > 0, tree_ids, 0).astype(np.int64),
    )


def step_trees(num_drafts: np.ndarray, recorded: np.ndarray, sizes: np.ndarray, largest: int) -> np.ndarray:
    """[B] the tree each request's scheduled drafts are verified as: the one they were made for
    (``recorded``, -1: none), unless vLLM scheduled more drafts than it has nodes (placeholder
    slots after a change of draft count, or drafts never made): then the largest tree, whose
    first nodes any drafts are (verification stays exact; they are rejected in practice). 0 for
    requests without drafts."""
    fits = (recorded >= 0) & (num_drafts <= sizes[np.clip(recorded, 0, None)])
    return np.where(num_drafts > 0, np.where(fits, recorded, largest), 0)


def uniform_tree(plan: StepPlan, spec_ok: np.ndarray, num_drafts: np.ndarray, sizes: list[int]) -> int | None:
    """The tree every request of a step verifies whole (all decoding, all with drafts of one
    tree, each as many as it has nodes), or None."""
    if not plan.all_reqs or not spec_ok.all() or len(plan.tree_ids) == 0:
        return None
    k = int(plan.tree_ids[0])
    if (plan.tree_ids != k).any() or (num_drafts != sizes[k]).any():
        return None
    return k


def can_speculate(sp, logprobs_mode: str = "raw_logprobs") -> bool:
    """Sampling options the tree verifier reproduces exactly (others decode normally).
    Penalties, logit biases and allowed token ids are applied per tree row
    (:mod:`medusa_vllm.penalties`), min-p with temperature, top-k and top-p (:mod:`medusa_vllm.sampling`);
    logprobs come from the raw logits of the row that produced each token (vLLM's "raw" logprobs
    modes, its default; the "processed" ones are not reproduced)."""
    if sp is None:
        return False
    return (
        (sp.logprobs is None or logprobs_mode in ("raw_logprobs", "raw_logits"))
        and sp.logprob_token_ids is None
        and not sp.bad_words
        and sp.min_tokens == 0
        and sp.structured_outputs is None
        and not getattr(sp, "thinking_token_budget", None)
    )


def tree_lead(has_drafts: np.ndarray, num_scheduled: np.ndarray, max_query: int) -> int:
    """How many leading requests of a V2 step go to the tree kernel: through the last request
    with drafts (V2 orders requests with the full query length first, shorter ones by length,
    so that run holds every request with drafts; any short prefill chunk among them gets the
    causal mask). Raises if a request of that run is longer than the kernel's query."""
    if not has_drafts.any():
        return 0
    lead = len(has_drafts) - int(np.argmax(has_drafts[::-1]))
    if int(num_scheduled[:lead].max()) > max_query:
        raise RuntimeError(
            f"medusa_vllm: a request with drafts sits behind a query longer than {max_query} tokens "
            "(vLLM's V2 batch order, sort_batch_req_ids, changed?)")
    return lead


# what the V2 runner does with a request's drafts (v2_mode)
V2_NO_SPEC, V2_GREEDY, V2_SAMPLED = 0, 1, 2


def v2_mode(sp, logprobs_mode: str = "raw_logprobs") -> int:
    """How the V2 runner verifies a request: V2_GREEDY (temperature 0: the target argmax),
    V2_SAMPLED (temperature, top-k, top-p, min-p, seeded or not: lossless rejection sampling,
    or typical acceptance), both with logit biases, allowed tokens and repetition, presence and
    frequency penalties per tree row, and logprobs in vLLM's raw modes (from each emitted
    token's row); or V2_NO_SPEC (anything :func:`can_speculate` refuses: bad words,
    min_tokens, structured output, logprob_token_ids, processed logprobs): such a request's
    drafts are rejected and its tokens come from vLLM's sampler."""
    from vllm.sampling_params import _SAMPLING_EPS

    if not can_speculate(sp, logprobs_mode):
        return V2_NO_SPEC
    return V2_GREEDY if sp.temperature < _SAMPLING_EPS else V2_SAMPLED
