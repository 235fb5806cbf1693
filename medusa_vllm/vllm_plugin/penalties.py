"""vLLM's per-request penalties and allowed tokens on the tree rows' logits (the vLLM side of
:mod:`medusa_vllm.penalties`): read from vLLM's ``SamplingMetadata``, applied with vLLM's own
repetition-penalty op, so verification sees the logits vLLM's sampler would without speculation.
"""

from __future__ import annotations

import torch

from medusa_vllm.penalties import LogitBias, Penalties, apply_tree_penalties, path_tokens
from medusa_vllm.tree_tensors import TreeTensors


def _builtin_processor(sm, kind: str, cls: type):
    """The batch's vLLM logits processor of class ``cls`` in its ``kind`` group
    ("non_argmax_invariant" or "argmax_invariant"), or None (the plugin builds vLLM's builtin
    processors for medusa_vllm: vllm_plugin.register)."""
    procs = getattr(sm, "logitsprocs", None)
    return next((p for p in (getattr(procs, kind) if procs is not None else ()) if isinstance(p, cls)), None)


def logit_bias_processor(sm):
    """vLLM's logit-bias processor of the batch if some request has a ``logit_bias``, else None."""
    from vllm.v1.sample.logits_processor import LogitBiasLogitsProcessor

    p = _builtin_processor(sm, "non_argmax_invariant", LogitBiasLogitsProcessor)
    return p if p is not None and p.biases else None


def min_p_of(sm, num_reqs: int) -> torch.Tensor | None:
    """[B] float32 min-p of each request (0: off) from vLLM's min-p processor, or None if no
    request of the batch uses it."""
    from vllm.v1.sample.logits_processor import MinPLogitsProcessor

    p = _builtin_processor(sm, "argmax_invariant", MinPLogitsProcessor)
    return p.min_p[:num_reqs, 0].float() if p is not None and p.min_p_count else None


def needs_tree_processing(sm) -> bool:
    """Some request of the batch has penalties, an allowed-token list or logit biases."""
    return (not sm.no_penalties or sm.allowed_token_ids_mask is not None
            or logit_bias_processor(sm) is not None)


def penalties_of(sm, num_reqs: int, vocab: int, device: torch.device, max_rows: int = 1) -> Penalties:
    """The batch's penalty state (B = ``num_reqs`` requests, in batch order; ``max_rows``: the
    most logits rows a request has). Call ``input_batch.update_async_output_token_ids()``
    first under asynchronous scheduling."""
    from vllm._custom_ops import apply_repetition_penalties
    from vllm.model_executor.layers.utils import get_token_bin_counts_and_mask
    from vllm.utils.torch_utils import PIN_MEMORY, make_tensor_with_pad

    allowed = sm.allowed_token_ids_mask
    allowed = allowed[:num_reqs] if allowed is not None else None
    bias = None
    proc = logit_bias_processor(sm)
    if proc is not None:  # entries (batch index, token) -> value, on the device already
        reqs, tokens = proc.logits_slice
        bias = LogitBias(reqs.long(), tokens.long(), proc.bias_tensor.float(), max_rows)
    if sm.no_penalties:
        return Penalties(None, None, None, None, None, allowed, bias=bias)
    _, prompt_mask = get_token_bin_counts_and_mask(sm.prompt_token_ids[:num_reqs], vocab, num_reqs)
    out = make_tensor_with_pad(sm.output_token_ids[:num_reqs], pad=vocab, device="cpu",
                               dtype=torch.int64, pin_memory=PIN_MEMORY).to(device, non_blocking=True)
    out.masked_fill_(out < 0, vocab)  # async placeholders of requests without penalties
    counts, _ = get_token_bin_counts_and_mask(out, vocab, num_reqs)
    return Penalties(prompt_mask, counts, sm.presence_penalties[:num_reqs].float(),
                     sm.frequency_penalties[:num_reqs].float(),
                     sm.repetition_penalties[:num_reqs].float(), allowed,
                     repetition_fn=apply_repetition_penalties,
                     candidates=torch.cat([sm.prompt_token_ids[:num_reqs], out], dim=1), bias=bias)


def tree_logits(
    logits: torch.Tensor,  # [R, V] rows of each request: its root, then its first num_drafts nodes
    sm,  # vLLM's SamplingMetadata of the batch
    num_drafts: torch.Tensor,  # [B] nodes verified per request (device)
    drafts: torch.Tensor,  # [B, W] draft token of node i+1 (W >= the most nodes; padding ignored)
    tree_ids: torch.Tensor,  # [B] tree each request's drafts follow
    trees: TreeTensors,
) -> torch.Tensor:
    """A float32 copy of ``logits`` with each row penalized as vLLM would penalize the next
    token had the row's path been accepted (no host syncs)."""
    b = num_drafts.shape[0]
    r, v = logits.shape
    dev = logits.device
    rows = 1 + num_drafts.long()
    req = torch.repeat_interleave(torch.arange(b, device=dev), rows, output_size=r)  # [R]
    slot = torch.arange(r, device=dev) - (torch.cumsum(rows, 0) - rows)[req]  # [R]
    slot_tokens = torch.cat([torch.zeros_like(drafts[:, :1]), drafts], dim=1).long().clamp_min(0)
    path = path_tokens(slot_tokens, trees.parents[tree_ids], req, slot, trees.max_depth)
    pen = penalties_of(sm, b, v, dev, max_rows=trees.parents.shape[1])
    return apply_tree_penalties(logits.to(torch.float32, copy=True), req, path, pen)


def check_tree_logits(got: torch.Tensor, logits: torch.Tensor, sm, num_drafts: torch.Tensor,
                      drafts: torch.Tensor, tree_ids: torch.Tensor, trees: TreeTensors) -> int:
    """Debugging (host syncs): recomputes every row of :func:`tree_logits` with the request's
    logit biases (from vLLM's processor's host dict) and vLLM's own ``apply_penalties`` from
    the row's history spelled out (the request's output, then the
    draft tokens on the path root -> slot walked with the tree's parents) and raises if any row
    differs. Returns the rows checked."""
    from vllm.model_executor.layers.utils import apply_penalties

    r, v = logits.shape
    n, d, t = num_drafts.tolist(), drafts.tolist(), tree_ids.tolist()
    req, hist = [], []
    for b in range(len(n)):
        out = [x if x >= 0 else v for x in sm.output_token_ids[b]] if not sm.no_penalties else []
        for slot in range(1 + n[b]):
            path, s = [], slot
            while s > 0:
                path.append(d[b][s - 1])
                s = int(trees.trees[t[b]].parents[s])
            req.append(b)
            hist.append(out + path[::-1])
    assert len(req) == r, (len(req), r)
    want = logits.to(torch.float32, copy=True)
    rows = torch.tensor(req, device=logits.device)
    proc = logit_bias_processor(sm)
    if proc is not None:  # vLLM: logits[req, token] += bias, before the penalties
        for i, b in enumerate(req):
            for token, value in proc.biases.get(b, {}).items():
                want[i, token] += value
    if not sm.no_penalties:
        width = max(1, max(len(h) for h in hist))
        out_t = torch.tensor([h + [v] * (width - len(h)) for h in hist], device=logits.device)
        want = apply_penalties(want, sm.prompt_token_ids[rows], out_t, sm.presence_penalties[rows],
                               sm.frequency_penalties[rows], sm.repetition_penalties[rows])
    if sm.allowed_token_ids_mask is not None:
        want.masked_fill_(sm.allowed_token_ids_mask[rows], float("-inf"))
    bad = [i for i in range(r) if not torch.equal(got[i], want[i])]
    if bad:
        raise AssertionError(f"medusa_vllm: tree penalties differ from vLLM's on rows {bad[:8]} of {r} "
                             f"(requests {[req[i] for i in bad[:8]]})")
    return r
